"""The Soft-RoCE guest runner (``ci/softroce.py``) without booting a guest, plus its fast failure paths.

Booting takes 15-30 s of TCG per run, so the boot itself is exercised by CI's guest suite and by
the opt-in tests at the end (``UMBRA_BOOT_TESTS=1``); everything here runs in well under a second
except the bogus-kernel checks, which reach QEMU but fail before any emulation.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("softroce", ROOT / "ci" / "softroce.py")
assert _spec is not None and _spec.loader is not None
softroce = importlib.util.module_from_spec(_spec)
sys.modules["softroce"] = softroce
_spec.loader.exec_module(softroce)

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu not installed")


# ------------------------------------------------------------------------------ arguments

def test_defaults_and_the_command_after_the_separator():
    opts = softroce.parse_args(["--", ".venv/bin/python", "-m", "pytest", "-m", "rdma", "--timeout", "5"])
    assert opts.command == [".venv/bin/python", "-m", "pytest", "-m", "rdma", "--timeout", "5"]
    assert (opts.mtu, opts.mem, opts.smp, opts.timeout, opts.keep_log) == (1500, "4G", 2, 1800.0, False)
    assert opts.project_dir == ROOT and opts.pvh and opts.cpu == "max"
    assert not softroce.parse_args(["--no-pvh", "--", "true"]).pvh


def test_options_before_the_separator():
    opts = softroce.parse_args(["--mtu", "9000", "--mem", "3072M", "--smp", "1", "--timeout", "60",
                                "--keep-log", "--env", "A=b=c", "--env", "EMPTY=", "--", "true"])
    assert (opts.mtu, opts.mem, opts.smp, opts.timeout, opts.keep_log) == (9000, "3072M", 1, 60.0, True)
    assert opts.env == {"A": "b=c", "EMPTY": ""}
    assert opts.command == ["true"]


@pytest.mark.parametrize("argv", [
    [], ["--mtu", "9000"], ["--"], ["--mtu", "100", "--", "true"], ["--mtu", "x", "--", "true"],
    ["--mem", "4", "--", "true"], ["--smp", "0", "--", "true"], ["--timeout", "-1", "--", "true"],
    ["--env", "1X=2", "--", "true"], ["--bogus", "--", "true"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert softroce.main(argv) == softroce.EXIT_USAGE
    assert "usage: ci/softroce-run" in capsys.readouterr().err


def test_wrapper_prints_help():
    proc = subprocess.run([str(ROOT / "ci" / "softroce-run"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--mtu" in proc.stdout and "91 timeout" in proc.stdout


# ------------------------------------------------------------------------------- kernel, modules

def _fake_kernels(tmp_path: Path, versions: dict[str, bool]) -> tuple[Path, Path]:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for ver, has_rxe in versions.items():
        (boot / f"vmlinuz-{ver}").write_bytes(b"k")
        (mods / ver / ("kernel/drivers/infiniband/sw/rxe" if has_rxe else "kernel")).mkdir(parents=True)
    return boot, mods


def test_find_kernel_takes_the_newest_with_rxe(tmp_path):
    boot, mods = _fake_kernels(tmp_path, {"6.1.0-9-amd64": True, "6.1.0-56-amd64": True,
                                          "6.12.0-1-amd64": False})
    k = softroce.find_kernel(boot, mods)
    assert k.version == "6.1.0-56-amd64" and k.image == boot / "vmlinuz-6.1.0-56-amd64"
    assert k.modules_dir == mods / "6.1.0-56-amd64"


def test_find_kernel_errors(tmp_path):
    boot, mods = _fake_kernels(tmp_path, {"6.12.0-1-amd64": False})
    with pytest.raises(softroce.RunnerError, match="rdma_rxe"):
        softroce.find_kernel(boot, mods)
    with pytest.raises(softroce.RunnerError, match="not found"):
        softroce.find_kernel(boot, mods, image=tmp_path / "nope")
    odd = tmp_path / "bzImage"
    odd.write_bytes(b"k")
    with pytest.raises(softroce.RunnerError, match="--kernel-version"):
        softroce.find_kernel(boot, mods, image=odd)
    assert softroce.find_kernel(boot, mods, image=odd, version="6.12.0-1-amd64").image == odd


def test_parse_show_depends():
    text = ("builtin crc32c\n"
            "insmod /lib/modules/v/kernel/drivers/virtio/virtio_ring.ko \n"
            "insmod /lib/modules/v/kernel/net/9p/9pnet.ko debug=1\n")
    assert softroce.parse_show_depends(text) == [Path("/lib/modules/v/kernel/drivers/virtio/virtio_ring.ko"),
                                                Path("/lib/modules/v/kernel/net/9p/9pnet.ko")]
    with pytest.raises(softroce.RunnerError):
        softroce.parse_show_depends("FATAL: Module nope not found\n")


def test_module_order_of_the_installed_kernel():
    try:
        kernel = softroce.find_kernel()
    except softroce.RunnerError as exc:
        pytest.skip(str(exc))
    names = [p.name.split(".ko")[0] for p in softroce.module_load_order(kernel)]
    assert len(names) == len(set(names))
    for before, after in [("virtio_ring", "virtio_pci"), ("virtio", "virtio_net"), ("9pnet", "9pnet_virtio"),
                          ("9pnet", "9p"), ("virtio_pci", "9p")]:
        if before in names and after in names:
            assert names.index(before) < names.index(after)
    assert {"virtio_pci", "virtio_net", "9pnet_virtio", "9p"} <= set(names)


# -------------------------------------------------------------------------------- initramfs

def test_cpio_archive_reads_back_with_busybox(tmp_path):
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed")
    c = softroce.Cpio()
    c.directory("bin")
    c.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    c.file("odd", b"x" * 5)
    c.symlink("bin/sh", "busybox")
    c.chardev("console", 5, 1)
    blob = c.finish()
    assert len(blob) % 512 == 0
    listing = subprocess.run([busybox, "cpio", "-tv"], input=blob, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert any(line.startswith("crw") and line.endswith("console") for line in lines)
    assert any(line.startswith("lrwxrwxrwx") and "bin/sh -> busybox" in line for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith("bin/tool") for line in lines)
    out = tmp_path / "x"
    out.mkdir()
    got = subprocess.run([busybox, "cpio", "-id", "odd", "bin/tool"], input=blob, cwd=out,
                         capture_output=True, timeout=30)
    assert got.returncode == 0, got.stderr
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"xxxxx"


def test_elf_static_check():
    busybox = Path("/bin/busybox")
    if busybox.is_file():
        assert softroce.elf_is_static(busybox)
    assert not softroce.elf_is_static(Path(os.path.realpath(sys.executable)))


def test_initramfs_is_cached_by_its_inputs(tmp_path):
    try:
        kernel = softroce.find_kernel()
        softroce.find_busybox()
    except softroce.RunnerError as exc:
        pytest.skip(str(exc))
    first = softroce.build_initramfs(kernel, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert softroce.build_initramfs(kernel, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    listing = subprocess.run(["busybox", "cpio", "-t"], stdin=first.open("rb"), capture_output=True,
                             timeout=30).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console", "modules.order", "lib/modules/9p.ko"} <= set(listing)


def _elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal 64-bit ELF with one PT_NOTE segment holding the given (name, type) notes."""
    body = b""
    for name, ntype in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), 4, ntype) + n + b"\0" * (-len(n) % 4) + b"\0" * 4
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)  # PT_NOTE
    struct.pack_into("<Q", phdr, 8, 64 + 56)  # p_offset
    struct.pack_into("<Q", phdr, 32, len(body))  # p_filesz
    return bytes(header) + bytes(phdr) + body


def test_pvh_note_detection():
    assert softroce.has_pvh_entry(_elf_with_notes([(b"GNU", 3), (b"Xen", 18)]))
    assert not softroce.has_pvh_entry(_elf_with_notes([(b"Xen", 17), (b"GNU", 18)]))
    assert not softroce.has_pvh_entry(b"MZ not an elf")


def test_kernel_payload_extraction():
    elf = _elf_with_notes([(b"Xen", 18)]) + bytes(1000)
    for blob in (lzma.compress(elf, format=lzma.FORMAT_XZ), gzip.compress(elf)):
        # a bzImage is a setup stub followed by the compressed payload and a trailer
        image = b"\x1f\x8b\x08 decoy" + bytes(600) + blob + b"trailer"
        assert softroce.decompress_kernel(image) == elf
    assert softroce.decompress_kernel(b"no payload here") is None


def test_the_installed_kernel_boots_as_pvh():
    try:
        kernel = softroce.find_kernel()
    except softroce.RunnerError as exc:
        pytest.skip(str(exc))
    elf = softroce.decompress_kernel(kernel.image.read_bytes())
    assert elf is not None and softroce.has_pvh_entry(elf)


# ------------------------------------------------------------------------ guest script, env

def test_shell_command_survives_the_shell(tmp_path):
    argv = [sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))",
            "a b", "it's", '"q"', "$HOME", "`x`", "*", "", "back\\slash", "new\nline"]
    out = subprocess.run(["sh", "-c", softroce.shell_command(argv)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=30)
    assert json.loads(out.stdout) == argv[3:]


def test_guest_environment():
    opts = softroce.parse_args(["--env", "UMBRA_RDMA_GID_INDEX=2", "--", "true"])
    host = {"UMBRA_RDMA_DEVICE": "mlx5_0", "UMBRA_X": "1", "PYTEST_ADDOPTS": "-x", "SECRET_TOKEN": "s",
            "HOME": "/root", "NUMBA_CPU_NAME": "skylake", "TERM": "xterm"}
    env = softroce.guest_environment(opts, ROOT, host, stdout_is_tty=False)
    assert env["UMBRA_RDMA_DEVICE"] == "rxe0" and env["UMBRA_RDMA_PORT"] == "1"
    assert env["UMBRA_RDMA_GID_INDEX"] == "2" and env["UMBRA_X"] == "1" and env["PYTEST_ADDOPTS"] == "-x"
    assert "SECRET_TOKEN" not in env
    assert env["HOME"].startswith("/tmp") and env["TMPDIR"] == "/tmp" and env["TERM"] == "dumb"
    assert env["NUMBA_CACHE_DIR"] == str(opts.work_dir / "numba-cache")
    assert env["NUMBA_CPU_NAME"] == "skylake"  # an explicit host choice wins over the generic default
    assert env["UMBRA_GUEST_MTU"] == "1500"
    if (ROOT / ".venv" / "bin").is_dir():
        assert env["PATH"].split(":")[0] == str(ROOT / ".venv" / "bin")
    plain = softroce.guest_environment(opts, ROOT, {}, stdout_is_tty=True)
    assert plain["NUMBA_CPU_NAME"] == "generic" and plain["TERM"] == "dumb"


def test_guest_script_runs_setup_then_the_command(tmp_path):
    opts = softroce.parse_args(["--mtu", "9000", "--", "sh", "-c", "echo \"$1\"", "-", "a'b"])
    env = {"UMBRA_RDMA_DEVICE": "rxe0", "WEIRD": "x y'z"}
    script = softroce.guest_script(opts, tmp_path / "run", ROOT, env)
    for needle in ["modprobe crc32_generic", "modprobe rdma_rxe", "ip link set eth0 mtu 9000",
                   "rdma link add rxe0 type rxe netdev eth0", "export WEIRD='x y'\"'\"'z'",
                   f"cd {ROOT}", '"$RUN/rc"']:
        assert needle in script, needle
    assert script.index("modprobe crc32_generic") < script.index("modprobe rdma_rxe")
    assert script.index("rdma link add") < script.index("running:") < script.index("( sh -c")
    subprocess.run(["sh", "-n"], input=script, text=True, check=True, timeout=30)  # valid shell


def test_guest_workdir():
    assert softroce.guest_workdir(ROOT, ROOT / "tests") == ROOT / "tests"
    assert softroce.guest_workdir(ROOT, ROOT) == ROOT
    assert softroce.guest_workdir(ROOT, Path("/")) == ROOT


def test_qemu_command_shares_and_rejects_unsafe_paths(tmp_path):
    opts = softroce.parse_args(["--mem", "2G", "--smp", "1", "--", "true"])
    kernel = softroce.Kernel("v", Path("/boot/vmlinuz-v"), Path("/lib/modules/v"))
    cmd = softroce.qemu_command(opts, kernel, tmp_path / "i.cpio", tmp_path / "run")
    assert cmd[cmd.index("-kernel") + 1] == "/boot/vmlinuz-v"
    pvh = softroce.qemu_command(opts, kernel, tmp_path / "i.cpio", tmp_path / "run", tmp_path / "vmlinux")
    assert pvh[pvh.index("-kernel") + 1] == str(tmp_path / "vmlinux")
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64" and "tcg,thread=multi" in cmd and "-no-reboot" in cmd
    assert "path=/,mount_tag=hostroot" in joined and "readonly=on" in joined
    assert f"path={ROOT},mount_tag=project" in joined
    assert f"umbra_run={tmp_path / 'run'}" in joined and "-m 2G -smp 1" in joined
    opts.project_dir = Path("/tmp/a b")
    with pytest.raises(softroce.RunnerError, match="whitespace"):
        softroce.qemu_command(opts, kernel, tmp_path / "i.cpio", tmp_path / "run")


# ----------------------------------------------------------------------------- exit codes

def test_exit_codes_keep_command_boot_and_timeout_apart():
    out = softroce.Outcome
    assert softroce.exit_code(out(cmd_rc=0, started_at=1.0)) == 0
    assert softroce.exit_code(out(cmd_rc=5, started_at=1.0, qemu_rc=0)) == 5
    assert softroce.exit_code(out(cmd_rc=3, timed_out=True, started_at=1.0)) == 3  # finished just in time
    assert softroce.exit_code(out(timed_out=True, started_at=1.0)) == softroce.EXIT_TIMEOUT
    assert softroce.exit_code(out(timed_out=True)) == softroce.EXIT_TIMEOUT
    boot_failure = softroce.EXIT_BOOT_FAILURE
    assert softroce.exit_code(out(qemu_rc=1, qemu_error="could not load kernel")) == boot_failure
    assert softroce.exit_code(out(boot_timed_out=True)) == softroce.EXIT_BOOT_FAILURE
    assert softroce.exit_code(out(qemu_rc=0, setup_failure="rdma link add")) == softroce.EXIT_BOOT_FAILURE
    assert softroce.exit_code(out(qemu_rc=0, started_at=1.0)) == softroce.EXIT_GUEST_LOST
    opts = softroce.parse_args(["--", "true"])
    assert "BOOT FAILURE" in softroce.describe(out(setup_failure="setup failed: modprobe rdma_rxe"), opts)
    assert "TIMEOUT" in softroce.describe(out(timed_out=True), opts)
    assert "GUEST LOST" in softroce.describe(out(qemu_rc=0, started_at=1.0), opts)


def _run_wrapper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "ci" / "softroce-run"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_missing_kernel_is_a_boot_failure(tmp_path):
    proc = _run_wrapper("--work-dir", str(tmp_path), "--kernel", str(tmp_path / "vmlinuz-none"), "--", "true")
    assert proc.returncode == softroce.EXIT_BOOT_FAILURE
    assert "BOOT FAILURE" in proc.stderr and "kernel image not found" in proc.stderr


@needs_qemu
def test_garbage_kernel_is_a_boot_failure(tmp_path):
    try:
        version = softroce.find_kernel().version
    except softroce.RunnerError as exc:
        pytest.skip(str(exc))
    bogus = tmp_path / f"vmlinuz-{version}"
    bogus.write_bytes(b"\x00not a kernel" * 4096)
    proc = _run_wrapper("--work-dir", str(tmp_path / "work"), "--boot-timeout", "60", "--kernel", str(bogus),
                        "--", "true", timeout=120)
    assert proc.returncode == softroce.EXIT_BOOT_FAILURE, proc.stderr
    assert "BOOT FAILURE" in proc.stderr and "qemu exited" in proc.stderr


# ------------------------------------------------------ real boots (opt-in: 20-60 s each)

boots = pytest.mark.skipif(os.environ.get("UMBRA_BOOT_TESTS") != "1",
                           reason="boots a TCG guest (20-60 s); set UMBRA_BOOT_TESTS=1 to run")


@needs_qemu
@boots
@pytest.mark.slow
def test_guest_exit_code_comes_back():
    proc = _run_wrapper("--quiet", "--", "sh", "-c", "echo in-guest $UMBRA_RDMA_DEVICE; exit 7", timeout=600)
    assert proc.returncode == 7, proc.stderr
    assert "in-guest rxe0" in proc.stdout


@needs_qemu
@boots
@pytest.mark.slow
def test_guest_timeout_is_reported_as_such():
    proc = _run_wrapper("--quiet", "--timeout", "90", "--", "sleep", "1000", timeout=600)
    assert proc.returncode == softroce.EXIT_TIMEOUT, proc.stderr
    assert "TIMEOUT" in proc.stderr


def test_rdma_tests_live_where_ci_runs_them():
    """CI runs ``-m rdma tests/rdma`` in the guest (collecting the whole suite there would import
    every host-only dependency under TCG); an rdma test elsewhere would silently never run."""
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
             if "rdma" not in p.relative_to(ROOT / "tests").parts[:-1] and p.name != Path(__file__).name
             and "mark.rdma" in p.read_text(errors="replace")]
    assert stray == [], f"move these rdma-marked tests under tests/rdma/: {stray}"
