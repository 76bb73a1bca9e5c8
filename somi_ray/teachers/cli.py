"""`somi-ray teacher inspect PATH [--against DIR] [--json FILE]`.

Heavy modules are imported inside the command so `somi-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register_cli(subparsers) -> None:
    """Add the `teacher` command group to an argparse subparsers object.

    Each leaf parser sets `func`, which returns 0 on success and raises SystemExit(2) with the
    error printed to stderr when the teacher is damaged or unsupported.
    """
    teacher = subparsers.add_parser("teacher", help="read and check teacher models")
    commands = teacher.add_subparsers(dest="teacher_command", required=True)
    inspect = commands.add_parser(
        "inspect", help="print a teacher's family, sizes and roles; with --against, how it aligns to SOMI")
    inspect.add_argument("path", help="Hugging Face folder, .gguf file or hub id")
    inspect.add_argument("--against", metavar="DIR",
                         help="SOMI checkpoint folder (tokenizer.json, config.json, model.safetensors) to align to")
    inspect.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    inspect.add_argument("--allow-pickle", action="store_true",
                         help="read pytorch_model.bin with torch.load(weights_only=True)")
    inspect.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Print the inspection report; exit with status 2 and the message on a TeacherError."""
    from .errors import TeacherError

    try:
        report = inspect_teacher(args.path, against=args.against, allow_pickle=args.allow_pickle)
    except TeacherError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    _print_report(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


def inspect_teacher(path: str, *, against: str | None = None, allow_pickle: bool = False) -> dict:
    """Return the inspection report as a dict (no output, no files written)."""
    from .build import build_package
    from .fingerprint import teacher_fingerprint
    from .sources import open_teacher

    with open_teacher(path, allow_pickle=allow_pickle) as reader:
        info = reader.info
        report = {
            "path": info.path, "family": info.family, "n_layers": info.n_layers, "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size, "tokenizer_size": info.tokenizer_size,
            "tied_embeddings": info.tied_embeddings, "roles": info.roles, "file_bytes": info.file_bytes,
        }
        if against:
            tokenizer, hidden, n_parts, embedding = load_somi_checkpoint(against)
            package = build_package(reader, tokenizer, hidden, n_parts, somi_embedding=embedding)
            report["against"] = teacher_fingerprint(package)
    return report


def load_somi_checkpoint(folder: str):
    """Read (tokenizer, hidden_size, n_parts, embedding) from a SOMI checkpoint folder."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from .errors import TeacherError

    paths = {name: os.path.join(folder, name) for name in ("tokenizer.json", "config.json", "model.safetensors")}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise TeacherError(path, name, "file is missing from the SOMI checkpoint",
                               "pass a folder written by SOMI's checkpoint code")
    try:
        with open(paths["config.json"]) as handle:
            config = json.load(handle)
        hidden, n_parts = int(config["hidden_size"]), int(config["n_parts"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise TeacherError(paths["config.json"], "hidden_size/n_parts", f"fields are missing or invalid ({error!r})",
                           "pass a folder written by SOMI's checkpoint code") from None
    try:
        with safe_open(paths["model.safetensors"], framework="np") as handle:
            embedding = handle.get_tensor("embedding.weight")
    except Exception as error:  # safetensors raises its own error type for a missing key or bad file
        raise TeacherError(paths["model.safetensors"], "embedding.weight", f"tensor cannot be read ({error})",
                           "pass a folder written by SOMI's checkpoint code") from None
    if embedding.ndim != 2 or embedding.shape[1] != hidden:
        raise TeacherError(paths["model.safetensors"], "embedding.weight",
                           f"shape {embedding.shape} does not match hidden_size {hidden}",
                           "pass a consistent SOMI checkpoint")
    return Tokenizer.from_file(paths["tokenizer.json"]), hidden, n_parts, embedding


def _print_report(report: dict) -> None:
    print(f"teacher      {report['path']}")
    print(f"family       {report['family']}")
    print(f"layers       {report['n_layers']}")
    print(f"hidden size  {report['hidden_size']}")
    print(f"vocab size   {report['vocab_size']} rows, tokenizer {report['tokenizer_size']} tokens"
          f"{', tied head' if report['tied_embeddings'] else ''}")
    print("roles        " + ", ".join(f"{role}×{count}" for role, count in report["roles"].items() if count))
    against = report.get("against")
    if against:
        print(f"coverage     {against['vocab_coverage']:.4f} ({against['shared_tokens']} shared tokens)")
        print(f"residual     {against['basis']['residual']:.4f} ({against['basis']['method']})")
        for band in against["bands"]:
            print(f"band {band['part']:<3}     layers {band['layers'][0]}-{band['layers'][-1]}: energy kept "
                  f"{band['energy_kept']:.4f}, delivered {band['energy_delivered']:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Run the `teacher` commands on their own, e.g. `python -m somi_ray.teachers.cli teacher inspect PATH`."""
    parser = argparse.ArgumentParser(prog="somi-ray")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
