"""The one exception type that every teacher reader raises for a damaged or unsupported teacher."""

from __future__ import annotations


class TeacherError(ValueError):
    """A teacher's files cannot be read as a causal LM.

    The message names the file, the tensor or field, what is wrong and how to fix it, so the
    CLI can print it as is.
    """

    def __init__(self, file: str, field: str, problem: str, fix: str):
        self.file = str(file)
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.file}: {field}: {problem}. Fix: {fix}")
