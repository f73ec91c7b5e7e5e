"""What every fuzz target in tests/fuzz/ shares: the libFuzzer limits, the seed corpus, the run.

Each ``fuzz_*.py`` is a script (``python tests/fuzz/fuzz_json.py -runs=N`` or
``-max_total_time=S``) built on :func:`fuzz`. Its property is the service's promise: an
input is either accepted or refused with the client-error exception its route turns into a
4xx; any other exception, a slow input or runaway memory is a crash, and libFuzzer writes
that input to the artefact directory. Corpora and artefacts go under the system's temp
directory (or the folders given on the command line), never into the repository.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# libFuzzer's defaults, unless the command line sets them: a request the service must answer
# within its timeout may not take seconds here either, and a body that fits FLUXO_MAX_BODY_BYTES
# may not need gigabytes to refuse.
LIMITS = {"-timeout": "10", "-rss_limit_mb": "2048"}


def _work_dir(target: str) -> Path:
    """The target's own folder under the temp directory; reused, so a standalone corpus grows run by run."""
    return Path(tempfile.gettempdir()) / f"fluxo-fuzz-{target}"


def fuzz(target: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes],
         dictionary: Iterable[bytes] = (), max_len: int = 4096,
         custom_mutator: Callable[[bytes, int, int], bytes] | None = None) -> None:
    """Run libFuzzer on ``test_one_input`` with sys.argv's options; never returns.

    ``seeds`` are written to a seed folder passed after any corpus folder of the command line
    (libFuzzer grows the first folder it is given, and reads the others). ``dictionary``
    holds tokens the mutator splices in (JSON keys and literals a byte flip rarely makes);
    ``custom_mutator`` (data, max_size, seed) → data, when the format needs help (checksums).
    """
    import atheris

    args = list(sys.argv)
    options = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    work = _work_dir(target)
    seed_dir = work / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (seed_dir / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    if "-artifact_prefix" not in options:
        args.append(f"-artifact_prefix={work}/")
    if "-dict" not in options and dictionary:
        tokens = work / "tokens.dict"
        tokens.write_text("".join(f'"{_escaped(t)}"\n' for t in dictionary))
        args.append(f"-dict={tokens}")
    if "-max_len" not in options:
        args.append(f"-max_len={max_len}")
    args += [f"{name}={value}" for name, value in LIMITS.items() if name not in options]
    given = [Path(a) for a in args[1:] if not a.startswith("-")]
    if not given:  # no corpus folder given: the target's own
        (work / "corpus").mkdir(exist_ok=True)
        args.append(str(work / "corpus"))
    if not any(path.is_file() for path in given):  # files given: libFuzzer replays just those
        args.append(str(seed_dir))
    atheris.Setup(args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def _escaped(token: bytes) -> str:
    """A dictionary entry in libFuzzer's quoted form: printable ASCII as is, the rest as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)
