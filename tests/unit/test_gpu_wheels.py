"""benchmarks/gpu_wheels.py's repack: bitsandbytes keeps only the GPU machine's CUDA library and the CPU one, and its
RECORD lists exactly what the wheel holds, with each file's real hash and size."""

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
