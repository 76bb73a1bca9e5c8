"""Teacher readers: open Hugging Face or GGUF causal LMs lazily, align them to SOMI, project them."""

from .basis import fit_basis
from .build import build_package
from .cli import register_cli
from .errors import TeacherError
from .fingerprint import teacher_fingerprint
from .package import Band, Basis, TeacherInfo, TeacherPackage, VocabAlignment
from .projection import iter_bands
from .sources import TeacherReader, open_teacher
from .vocab import align_vocab, canonical_token

__all__ = [
    "Band", "Basis", "TeacherError", "TeacherInfo", "TeacherPackage", "TeacherReader", "VocabAlignment",
    "align_vocab", "build_package", "canonical_token", "fit_basis", "iter_bands", "open_teacher",
    "register_cli", "teacher_fingerprint",
]
