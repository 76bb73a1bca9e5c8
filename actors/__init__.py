"""Ray actors and the Ray Serve application that run SOMI as a distributed system."""
