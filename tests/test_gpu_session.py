"""scripts/gpu_session.sh's `extras` stage: package sets carried in parts over several device calls; and
`fi_install`: FlashInfer's built modules, one carried set a head_dim.

Each call carries some `.extras/SET.tar.xz.<i>of<n>` parts (a new call's .extras replaces the last one's);
the stage keeps them on the machine and unpacks a set only once all n parts have come, exactly once.
"""
from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("xz") and shutil.which("tar")),
                                reason="needs bash, tar and xz")


def _parts(payload: dict[str, bytes], n: int, top: str = "site") -> list[bytes]:
    """A tar.xz of <top>/<name> files, cut into n parts as pack_extras.sh's (and fi_pack's) `split` does."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in payload.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = lzma.compress(raw.getvalue())
    step = -(-len(blob) // n)
    return [blob[i * step:(i + 1) * step] for i in range(n)]


def _call(tree: Path, root: Path, carried: dict[str, bytes]) -> str:
    """One device call: a fresh .extras holding `carried`, then `gpu_session.sh extras`."""
    shutil.rmtree(tree / ".extras", ignore_errors=True)
    (tree / ".extras").mkdir(parents=True)
    for name, data in carried.items():
        (tree / ".extras" / name).write_bytes(data)
    env = {"PATH": "/usr/bin:/bin", "EXTRAS_ROOT": str(root), "OUT": str(tree / "out"), "HOME": str(tree)}
    res = subprocess.run(["bash", str(SCRIPT), "extras"], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_set_carried_over_two_calls_is_unpacked_once_complete(tmp_path):
    tree, root = tmp_path / "repo", tmp_path / "machine"
    tree.mkdir()
    data = {"pkg/__init__.py": b"X = 1\n" * 5000, "pkg/lib.bin": bytes(range(256)) * 400}
    p = _parts(data, 3)
    names = [f"big.tar.xz.{i + 1}of3" for i in range(3)]
    small = _parts({"tiny/__init__.py": b"Y = 2\n"}, 1)[0]

    out = _call(tree, root, {names[0]: p[0], names[2]: p[2], "tiny.tar.xz.1of1": small})
    assert "big: 2 of 3 parts here" in out and "tiny: unpacked (1 parts)" in out
    assert not (root / "site" / "pkg").exists()
    assert (root / "site" / "tiny" / "__init__.py").read_bytes() == b"Y = 2\n"

    out = _call(tree, root, {names[1]: p[1]})          # the next call carries only the missing part
    assert "big: unpacked (3 parts)" in out and "tiny: unpacked earlier" in out
    for name, content in data.items():
        assert (root / "site" / name).read_bytes() == content

    (root / "site" / "pkg" / "__init__.py").write_bytes(b"edited")
    out = _call(tree, root, {})                         # nothing carried: nothing unpacked again
    assert "big: unpacked earlier" in out
    assert (root / "site" / "pkg" / "__init__.py").read_bytes() == b"edited"


def test_a_corrupt_part_leaves_nothing_and_a_repacked_set_replaces_the_old(tmp_path):
    tree, root = tmp_path / "repo", tmp_path / "machine"
    tree.mkdir()
    data = {"pkg/big.bin": bytes(range(256)) * 2000}
    good = _parts(data, 2)
    bad = bytes(b ^ 0xFF for b in good[1])
    out = _call(tree, root, {"p.tar.xz.1of2": good[0], "p.tar.xz.2of2": bad})
    assert "p: unpacking FAILED" in out
    assert not (root / "site" / "pkg").exists() and not list((root / "extras").glob("p.*"))

    out = _call(tree, root, {"p.tar.xz.1of2": good[0], "p.tar.xz.2of2": good[1]})
    assert "p: unpacked (2 parts)" in out and (root / "site" / "pkg" / "big.bin").read_bytes() == data["pkg/big.bin"]

    # Packed anew (three parts, other content) on the same warm machine: the old parts and marker go.
    new = {"pkg/big.bin": b"v2" * 9000}
    p3 = _parts(new, 3)
    out = _call(tree, root, {f"p.tar.xz.{i + 1}of3": p3[i] for i in range(3)})
    assert "p: packed anew" in out and "p: unpacked (3 parts)" in out
    assert (root / "site" / "pkg" / "big.bin").read_bytes() == new["pkg/big.bin"]
    assert sorted(f.name for f in (root / "extras").glob("p.*")) == [f"p.tar.xz.{i}of3" for i in (1, 2, 3)]


def test_fi_install_installs_every_carried_set(tmp_path):
    """`fi_install`: each set of FlashInfer modules carried in .fi_so/ (fi_pack's SET.tar.xz.NN parts of a tar
    of fi_so/*.so; one set a head_dim) lands in the wheel's AOT folder, a module a folder."""
    tree = tmp_path / "repo"
    (tree / "flashinfer").mkdir(parents=True)
    (tree / "flashinfer" / "__init__.py").write_text("")           # stands in for the installed wheel
    sets = {"fi_so": ({"a.so": b"A" * 3000, "b.so": b"B" * 10}, 2), "fi_so_hd64": ({"c.so": b"C"}, 1)}
    (tree / ".fi_so").mkdir()
    for name, (mods, n) in sets.items():
        for i, part in enumerate(_parts(mods, n, top="fi_so")):
            (tree / ".fi_so" / f"{name}.tar.xz.{i:02d}").write_bytes(part)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tree / "out"), "HOME": str(tree)}
    res = subprocess.run(["bash", str(SCRIPT), "fi_install"], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    aot = tree / "flashinfer" / "data" / "aot"
    for mods, _ in sets.values():
        for mod, data in mods.items():
            assert (aot / mod[:-3] / mod).read_bytes() == data
