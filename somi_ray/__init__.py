"""SOMI: a self-organising language model that absorbs open-weight teachers.

This package contains the model and everything that does not need Ray; the `actors`
package wraps it in Ray actors and a Ray Serve application.
"""

__version__ = "0.1.0"
