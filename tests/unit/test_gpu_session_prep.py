"""What the GPU session needs prepared here: benchmarks/gpu_wheels.py's repack (bitsandbytes keeps only the GPU
machine's CUDA library and the CPU one, and its RECORD lists exactly what the wheel holds, with each file's real hash
and size) and benchmarks/common/cases.py (each case in a subprocess, random checkpoints removed between models)."""

import base64
import hashlib
import zipfile

from benchmarks.gpu_wheels import repack


def test_repack_keeps_one_cuda_library_and_a_true_record(tmp_path):
    src = tmp_path / "in" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    src.parent.mkdir()
    files = {"bitsandbytes/__init__.py": b"x = 1\n", "bitsandbytes/libbitsandbytes_cpu.so": b"cpu",
             "bitsandbytes/libbitsandbytes_cuda128.so": b"a" * 1000, "bitsandbytes/libbitsandbytes_cuda130.so": b"130",
             "bitsandbytes/libbitsandbytes_rocm72.so": b"rocm", "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: b\n"}
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "stale\n")
    out = tmp_path / "out"
    out.mkdir()
    with zipfile.ZipFile(repack(src, "130", out)) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
    kept = set(files) - {"bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_rocm72.so"}
    assert names == kept | {"bitsandbytes-0.50.2.dist-info/RECORD"}
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"130").digest()).rstrip(b"=").decode()
    assert f"bitsandbytes/libbitsandbytes_cuda130.so,sha256={digest},3" in record
    assert {ln.split(",")[0] for ln in record} == names and "bitsandbytes-0.50.2.dist-info/RECORD,," in record


def test_each_case_empties_the_scratch_folder_between_models(tmp_path, monkeypatch):
    """Random checkpoints of one model are gone before the next model's cases (the GPU machine's disk holds only a
    few 8B checkpoints), and after the last; a case without a row is skipped."""
    import json
    import subprocess

    from benchmarks.common import cases

    scratch = tmp_path / "random"
    seen = []

    def fake_run(cmd, **kw):
        model, scheme = cmd[cmd.index("--case") + 1].split("|")
        seen.append((model, scheme, sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []))
        scratch.mkdir(exist_ok=True)
        (scratch / model).write_text("weights")
        out = "" if scheme == "bad" else "ROW " + json.dumps({"model": model, "scheme": scheme}) + "\n"
        return subprocess.CompletedProcess(cmd, 0, out, "boom")

    monkeypatch.setattr(cases.subprocess, "run", fake_run)
    rows = list(cases.each_case("benchmarks.x", ["a", "b"], ["bf16", "bad"], [], jsonl=str(tmp_path / "r.jsonl"),
                                scratch=str(scratch)))
    assert [(r["model"], r["scheme"]) for r in rows] == [("a", "bf16"), ("b", "bf16")]
    assert seen == [("a", "bf16", []), ("a", "bad", ["a"]), ("b", "bf16", []), ("b", "bad", ["b"])]
    assert not scratch.exists() and len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
