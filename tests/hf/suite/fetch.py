"""Fetch Hugging Face's own model tests (tests/test_modeling_common.py) for the installed transformers.

The wheel does not ship HF's tests; the sdist of the same version does. `prepare()` downloads that
sdist with pip (whatever index pip is configured for), extracts test_modeling_common.py into a cache
directory as the package `hf_model_tests`, and writes two stand-ins for the modules it imports that
the sdist does not carry (the generation and export test mixins: BERT encoders generate nothing, and
torch.export is not what fastbert changes). Nothing of HF's is committed to this repository.

    python -m tests.hf.suite.fetch          # prints the directory to put on sys.path
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "hf_model_tests"
FILES = ("tests/test_modeling_common.py",)
# the modules test_modeling_common imports relatively that the sdist lacks, and what stands in for them
STUBS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    \"\"\"Stand-in: no generate() tests here.\"\"\"\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    \"\"\"Stand-in: no torch.export tests here.\"\"\"\n",
}


def cache_root() -> Path:
    return Path(os.environ.get("FASTBERT_HF_TESTS_DIR", Path.home() / ".cache" / "fastbert" / "hf-tests"))


def prepare(version: str | None = None) -> Path:
    """The directory holding package `hf_model_tests` for `version` (default: the installed transformers).
    Raises RuntimeError, with pip's output, when the sdist cannot be fetched."""
    if version is None:
        import transformers

        version = transformers.__version__
    root = cache_root() / version
    pkg = root / PACKAGE
    done = pkg / ".complete"
    if done.exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: pip only reads the sdist's metadata, no isolated build env to set up
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"transformers=={version}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise RuntimeError(f"could not fetch the transformers {version} sdist ({' '.join(cmd)}):\n"
                               f"{r.stdout}\n{r.stderr}")
        pkg.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if rel in FILES:
                    data = tar.extractfile(member).read()
                    (pkg / Path(rel).name).write_bytes(data)
    missing = [f for f in FILES if not (pkg / Path(f).name).exists()]
    if missing:
        raise RuntimeError(f"the transformers {version} sdist has no {', '.join(missing)}")
    (pkg / "__init__.py").write_text("")
    for rel, text in STUBS.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").write_text("")
        path.write_text(text)
    done.write_text(version)
    return root


if __name__ == "__main__":
    print(prepare(sys.argv[1] if len(sys.argv) > 1 else None))
