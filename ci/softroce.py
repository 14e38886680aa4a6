"""Run a command inside a QEMU/TCG guest that has a Soft-RoCE device (``rxe0``).

Why a guest: the host kernel has no InfiniBand support, so no RDMA device can exist on the host;
Debian's stock kernel, booted under QEMU's software emulation, has ``rdma_rxe``. The guest sees the
host's root read-only over 9p (so the host's Python, venv and rdma-core are used unchanged), the
project directory read-write at the same path (so results land in the tree), and the work
directory (``ci/guest-work``: cached initramfs and kernel, numba's guest cache, and one directory
per run through which the command's exit code comes back, since the serial console mangles output).

How: an uncompressed initramfs (busybox-static plus the virtio/9p modules of the installed kernel,
in ``modprobe --show-depends`` order) mounts the shares and chroots into the host root; a per-run
``guest.sh`` loads ``crc32_generic`` then ``rdma_rxe``, sets the NIC MTU, adds ``rxe0`` on eth0,
waits for PORT_ACTIVE and the IPv4-mapped GID, and runs the command. The kernel boots as PVH from
a cached, decompressed copy (``--no-pvh`` boots the bzImage: ~6 s slower under TCG).

Usage: ``ci/softroce-run [--mtu 1500] [--mem 4G] [--smp 2] [--timeout S] [--keep-log] -- CMD...``

Exit codes: CMD's own exit code; 90 when the guest could not be booted or set up (kernel,
initramfs, 9p, rxe); 91 when the run timed out; 92 when the guest died after the command had started
without reporting its exit code (kernel panic, out of memory). 2 is a usage error.

Nothing is installed at run time: it needs what ``ci/setup.sh`` installs (qemu-system-x86,
linux-image-amd64, busybox-static, kmod, rdma-core, iproute2). Only the Python 3.11 stdlib is used.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXIT_USAGE = 2
EXIT_BOOT_FAILURE = 90
EXIT_TIMEOUT = 91
EXIT_GUEST_LOST = 92

PROJECT_DIR = Path(__file__).resolve().parent.parent
RXE_MODULE = "kernel/drivers/infiniband/sw/rxe"
# Modules the initramfs needs before it can mount the host root: PCI virtio, the NIC, 9p.
INITRAMFS_MODULES = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p")
# Bump when the initramfs layout or /init changes in a way the cache key would not see.
INITRAMFS_FORMAT = 1
MARK = "umbra-guest:"
GUEST_IP = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
RXE_NAME = "rxe0"
# Host variables forwarded into the guest so that one command line behaves the same in both.
FORWARD_ENV_PREFIXES = ("UMBRA_", "MOONCAKE_", "PYTEST_", "NUMBA_", "HYPOTHESIS_")


class RunnerError(Exception):
    """A failure of the runner itself before or while booting the guest (reported as exit 90)."""


@dataclass
class Options:
    """Parsed command line; defaults match the CI guest (2 vCPUs, 4 GiB, netdev MTU 1500)."""

    command: list[str]
    mtu: int = 1500
    mem: str = "4G"
    smp: int = 2
    timeout: float = 1800.0
    boot_timeout: float = 300.0
    keep_log: bool = False
    kernel: Path | None = None
    kernel_version: str | None = None
    work_dir: Path = PROJECT_DIR / "ci" / "guest-work"
    project_dir: Path = PROJECT_DIR
    env: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    cpu: str = "max"
    pvh: bool = True


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules_dir: Path


# ----------------------------------------------------------------------------------- arguments

def _mem(value: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[MG]", value):
        raise argparse.ArgumentTypeError(f"memory size like 4G or 3072M, got {value!r}")
    return value


def _mtu(value: str) -> int:
    try:
        mtu = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MTU must be an integer, got {value!r}") from None
    if not 1280 <= mtu <= 9000:
        raise argparse.ArgumentTypeError(f"MTU must be within 1280..9000 (1500 → RDMA MTU 1024, "
                                         f"9000 → 4096), got {mtu}")
    return mtu


def _positive(kind: type) -> argparse._ActionType:
    def parse(value: str) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
        return number
    return parse


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ci/softroce-run",
        description="Boot a QEMU/TCG guest with a Soft-RoCE device (rxe0) and run CMD in the project "
                    "directory. Exit code: CMD's; 90 boot/set-up failure; 91 timeout; 92 guest lost.",
        usage="%(prog)s [options] -- CMD [ARG...]")
    p.add_argument("--mtu", type=_mtu, default=1500,
                   help="netdev MTU of eth0 under rxe0: 1500 gives active MTU 1024, 9000 gives 4096")
    p.add_argument("--mem", type=_mem, default="4G", help="guest memory (default 4G)")
    p.add_argument("--smp", type=_positive(int), default=2, help="guest vCPUs (default 2)")
    p.add_argument("--timeout", type=_positive(float), default=1800.0,
                   help="seconds for the whole run, boot included (default 1800); exit 91 when hit")
    p.add_argument("--boot-timeout", type=_positive(float), default=300.0,
                   help="seconds until the command starts (default 300); exit 90 when hit")
    p.add_argument("--keep-log", action="store_true",
                   help="keep the per-run directory (console.log, guest.sh, rc) even on success")
    p.add_argument("--cpu", default="max", help="QEMU CPU model (default max)")
    p.add_argument("--no-pvh", dest="pvh", action="store_false",
                   help="boot the compressed bzImage through firmware instead of the extracted PVH "
                        "vmlinux (slower by about 6 s)")
    p.add_argument("--kernel", type=Path, help="kernel image (default: newest /boot/vmlinuz-* with rdma_rxe)")
    p.add_argument("--kernel-version",
                   help="module tree under /lib/modules for --kernel (default: from the image name)")
    p.add_argument("--work-dir", type=Path,
                   default=Path(os.environ.get("UMBRA_GUEST_WORK", PROJECT_DIR / "ci" / "guest-work")),
                   help="cache for the initramfs, numba's guest cache and per-run directories "
                        "(default ci/guest-work, or $UMBRA_GUEST_WORK)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for CMD (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the command's output, not the guest's boot messages (the console "
                        "tail is printed when the guest fails before the command ends)")
    return p


def parse_args(argv: Sequence[str]) -> Options:
    """Split at ``--``: everything after it is the guest command, verbatim."""
    argv = list(argv)
    parser = build_parser()
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1:]
    else:
        own, command = argv, []
    ns = parser.parse_args(own)
    if not command:
        parser.error("no command given; put it after --, e.g. ci/softroce-run -- .venv/bin/umbra doctor")
    return Options(command=command, mtu=ns.mtu, mem=ns.mem, smp=ns.smp, timeout=ns.timeout,
                   boot_timeout=ns.boot_timeout, keep_log=ns.keep_log, kernel=ns.kernel,
                   kernel_version=ns.kernel_version, work_dir=ns.work_dir.resolve(),
                   env=dict(ns.env), quiet=ns.quiet, cpu=ns.cpu, pvh=ns.pvh)


# -------------------------------------------------------------------------------------- kernel

def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)]


def find_kernel(boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules"),
                image: Path | None = None, version: str | None = None) -> Kernel:
    """The kernel to boot: an explicit image, or the newest /boot/vmlinuz-* whose module tree has rxe.

    The host's running kernel is irrelevant (it has no RDMA); what matters is that the image and a
    module tree with ``rdma_rxe`` belong together.
    """
    if image is not None:
        if not image.is_file():
            raise RunnerError(f"kernel image not found: {image}")
        if version is None:
            if not image.name.startswith("vmlinuz-"):
                raise RunnerError(f"cannot tell the module version of {image}; pass --kernel-version")
            version = image.name.removeprefix("vmlinuz-")
        mods = modules_root / version
        if not mods.is_dir():
            raise RunnerError(f"no module tree {mods} for kernel {image}")
        return Kernel(version, image, mods)
    candidates = []
    for img in boot_dir.glob("vmlinuz-*"):
        ver = img.name.removeprefix("vmlinuz-")
        if version is not None and ver != version:
            continue
        if (modules_root / ver / RXE_MODULE).is_dir():
            candidates.append(Kernel(ver, img, modules_root / ver))
    if not candidates:
        raise RunnerError(f"no kernel in {boot_dir} with rdma_rxe under {modules_root}/<version>/"
                          f"{RXE_MODULE}; install linux-image-amd64 (bash ci/setup.sh)")
    return max(candidates, key=lambda k: _version_key(k.version))


def parse_show_depends(text: str) -> list[Path]:
    """Module files in load order from ``modprobe --show-depends`` output (built-ins skipped)."""
    out: list[Path] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod":
            out.append(Path(parts[1]))
        elif parts and parts[0] not in ("builtin",):
            raise RunnerError(f"unexpected modprobe output line: {line!r}")
    return out


def module_load_order(kernel: Kernel, modules: Iterable[str] = INITRAMFS_MODULES,
                      modprobe: str = "modprobe") -> list[Path]:
    """Dependency-ordered module files for the initramfs, without duplicates.

    One ``modprobe --show-depends`` call per module: with several names modprobe treats all but the
    first as module parameters.
    """
    exe = shutil.which(modprobe) or shutil.which(modprobe, path="/usr/sbin:/sbin")
    if exe is None:
        raise RunnerError("modprobe not found; install kmod (bash ci/setup.sh)")
    order: list[Path] = []
    for name in modules:
        proc = subprocess.run([exe, "-S", kernel.version, "--show-depends", name],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RunnerError(f"modprobe --show-depends {name} for {kernel.version} failed: "
                              f"{proc.stderr.strip()}")
        for path in parse_show_depends(proc.stdout):
            if path not in order:
                order.append(path)
    return order


# ----------------------------------------------------------------------------------- initramfs

class Cpio:
    """Writer for the ``newc`` cpio format the kernel unpacks as initramfs.

    Written here rather than calling ``cpio`` so that no extra tool is needed and device nodes
    (``/dev/console``) can be created without root privileges.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._ino += 1
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        blob = b"".join(self._parts)
        return blob + b"\0" * (-len(blob) % 512)


def elf_is_static(path: Path) -> bool:
    """True when the ELF file has no program interpreter (runs without a libc in the initramfs)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise RunnerError(f"{path} is not a 64-bit ELF file")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def has_pvh_entry(elf: bytes) -> bool:
    """True when a 64-bit ELF kernel carries the PVH entry note (Xen note 18, PHYS32_ENTRY), which
    lets QEMU start it directly, without firmware or self-decompression."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        offset, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 8)
        size, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 32)
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def decompress_kernel(image: bytes) -> bytes | None:
    """The ELF ``vmlinux`` inside a bzImage (xz or gzip payload), or ``None`` when not found."""
    import lzma
    import zlib

    for magic, make in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
                        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))):
        pos = image.find(magic)
        while pos >= 0:
            try:
                out = make().decompress(image[pos:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            pos = image.find(magic, pos + 1)
    return None


def pvh_kernel(kernel: Kernel, work_dir: Path) -> Path | None:
    """An uncompressed, PVH-bootable copy of the kernel (cached), or ``None`` if it cannot be made.

    Booting the bzImage spends about 6 s under TCG in firmware and in the kernel decompressing
    itself before its first instruction of real work; QEMU starts a PVH ELF kernel directly.
    """
    st = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = work_dir / f"vmlinux-{kernel.version}-{key}"
    if target.is_file():
        return target
    elf = decompress_kernel(kernel.image.read_bytes())
    if elf is None or not has_pvh_entry(elf):
        return None
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as f:
        f.write(elf)
    os.replace(tmp, target)
    return target


def find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(cand)
        if path.is_file() and elf_is_static(path):
            return path
    raise RunnerError("no statically linked busybox found; install busybox-static (bash ci/setup.sh)")


INIT_SCRIPT = r"""#!/bin/busybox sh
# Umbra guest init: load virtio/9p, mount the host root read-only plus the project and work
# directories read-write at their host paths, run the per-run guest.sh in a chroot, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo
fail() { echo "umbra-guest: setup failed: $*"; sync; poweroff -f; sleep 60; }
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || fail "insmod $m"
done
[ -n "${umbra_project:-}" ] && [ -n "${umbra_work:-}" ] && [ -n "${umbra_run:-}" ] \
  || fail "umbra_project/umbra_work/umbra_run missing from the kernel command line"
o=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$o,ro,cache=loose" hostroot /newroot || fail "9p mount of the host root"
# The venv is taken from the read-only, page-cached root share rather than the uncached project
# share: importing numpy/numba/pandas/pytest touches thousands of files (pytest's start-up measured
# 5 s instead of 28 s). It is read-only in the guest as a result.
if [ -d "/newroot$umbra_project/.venv" ]; then
  mkdir -p /venv && mount --bind "/newroot$umbra_project/.venv" /venv
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
# The project is mounted after the tmpfs mounts so that a checkout under /tmp or /run is not
# hidden by them (its mount point is then created inside the tmpfs).
mkdir -p "/newroot$umbra_project" || fail "mount point $umbra_project"
mount -t 9p -o "$o,rw,cache=mmap" project "/newroot$umbra_project" || fail "9p mount of $umbra_project"
mkdir -p "/newroot$umbra_work" || fail "mount point $umbra_work"
mount -t 9p -o "$o,rw,cache=mmap" work "/newroot$umbra_work" || fail "9p mount of $umbra_work"
if [ -d /venv/bin ]; then
  mount --bind /venv "/newroot$umbra_project/.venv" || fail "bind the read-only venv"
fi
[ -f "/newroot$umbra_run/guest.sh" ] || fail "$umbra_run/guest.sh not visible in the guest"
# The kernel's on-demand module loader runs /sbin/modprobe of this initramfs: give it the module tree.
mkdir -p /lib/modules
mount --bind /newroot/lib/modules /lib/modules
echo /bin/modprobe > /proc/sys/kernel/modprobe
hostname localhost
chroot /newroot /bin/sh "$umbra_run/guest.sh"
echo "umbra-guest: guest.sh exited with $?"
sync
poweroff -f
sleep 60
"""


def initramfs_key(kernel: Kernel, busybox: Path, modules: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"{INITRAMFS_FORMAT}\n{INIT_SCRIPT}\n{kernel.version}\n".encode())
    for path in [busybox, *modules]:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_initramfs(kernel: Kernel, work_dir: Path) -> Path:
    """Build (or reuse) an uncompressed initramfs: busybox, /init and the virtio/9p modules.

    Uncompressed because unpacking gzip under TCG costs more than reading a few MiB more. Cached by
    a key over the inputs; written to a temporary name and renamed, so concurrent runs never see a
    half-written file.
    """
    busybox = find_busybox()
    modules = module_load_order(kernel)
    target = work_dir / f"initramfs-{kernel.version}-{initramfs_key(kernel, busybox, modules)}.cpio"
    if target.is_file():
        return target
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "tmp"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    names = []
    for path in modules:
        data = path.read_bytes()
        name = path.name
        if name.endswith(".xz"):
            import lzma
            data, name = lzma.decompress(data), name.removesuffix(".xz")
        elif not name.endswith(".ko"):
            raise RunnerError(f"cannot put compressed module {path} into the initramfs")
        cpio.file(f"lib/modules/{name}", data)
        names.append(name)
    cpio.file("modules.order", ("\n".join(names) + "\n").encode())
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(cpio.finish())
    os.replace(tmp, target)
    return target


def prune_builds(work_dir: Path, keep: set[Path], max_age_s: float = 86400) -> None:
    """Delete superseded initramfs and vmlinux builds. Only day-old ones: a run that started with
    an older runner may be about to hand its file to QEMU."""
    now = time.time()
    for path in [*work_dir.glob("initramfs-*.cpio"), *work_dir.glob("vmlinux-*")]:
        try:
            if path not in keep and now - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:
            continue


# ------------------------------------------------------------------------------- guest script

def shell_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def numba_cache_dir(work_dir: Path) -> Path:
    """numba's cache for guest runs; fill it on the host with ``NUMBA_CPU_NAME=generic`` too."""
    return work_dir / "numba-cache"


def guest_environment(opts: Options, workdir: Path, host_env: dict[str, str],
                      stdout_is_tty: bool) -> dict[str, str]:
    """The environment CMD runs with in the guest.

    The host root is read-only there, so HOME and TMPDIR point at tmpfs.

    numba: its on-disk cache is keyed by source path and mtime and by the CPU name and features.
    Under TCG ``-cpu max`` LLVM sees a ``k8-sse3``, not the host's CPU, so kernels cached on the
    host are compiled again in the guest (measured: 152 s for the packing kernels, against 10 s on
    the host). Hence ``NUMBA_CPU_NAME=generic`` (features then default to none) and a cache in the
    shared work directory: a cache the host fills with the same two settings is loaded by the
    guest (measured: all hits), and whatever the guest compiles itself survives to the next run.
    A host ``NUMBA_CPU_NAME`` or ``--env`` overrides the default.
    """
    venv_bin = opts.project_dir / ".venv" / "bin"
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if venv_bin.is_dir():
        path = f"{venv_bin}:{path}"
    env = {"NUMBA_CPU_NAME": "generic"}
    env.update({k: v for k, v in host_env.items() if k.startswith(FORWARD_ENV_PREFIXES)})
    env.update({
        "PATH": path,
        "HOME": "/tmp/home",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "TERM": host_env.get("TERM", "dumb") if stdout_is_tty else "dumb",
        "PYTHONUNBUFFERED": "1",
        "MPLCONFIGDIR": "/tmp/home/.config/matplotlib",
        "NUMBA_CACHE_DIR": str(numba_cache_dir(opts.work_dir)),
        "UMBRA_IN_GUEST": "1",
        "UMBRA_RDMA_DEVICE": RXE_NAME,
        "UMBRA_RDMA_PORT": "1",
        "UMBRA_GUEST_MTU": str(opts.mtu),
    })
    if host_env.get("VIRTUAL_ENV") or venv_bin.is_dir():
        env["VIRTUAL_ENV"] = str(opts.project_dir / ".venv")
    env["UMBRA_GUEST_WORKDIR"] = str(workdir)
    env.update(opts.env)
    return env


GUEST_SETUP = r"""# Set up rxe0 on eth0, then run the command. Runs in the guest, chrooted into the host root.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN={run}
fail() {{ printf 'umbra-guest: setup failed: %s\n' "$*"; exit 90; }}
mark() {{ printf 'umbra-guest: %s\n' "$*"; }}
modprobe crc32_generic || fail "modprobe crc32_generic"
modprobe rdma_rxe || fail "modprobe rdma_rxe"
ip link set lo up || fail "ip link set lo up"
ip link set eth0 mtu {mtu} || fail "ip link set eth0 mtu {mtu}"
ip link set eth0 up || fail "ip link set eth0 up"
ip addr add {ip} dev eth0 || fail "ip addr add {ip}"
ip route add default via {gateway} || fail "ip route add default"
rdma link add {rxe} type rxe netdev eth0 || fail "rdma link add {rxe} type rxe netdev eth0"
port=/sys/class/infiniband/{rxe}/ports/1
i=0
ipv4_gid='^0000:0000:0000:0000:0000:ffff:'
# The IPv4-mapped GID lands in the first slots; reading all 1024 sysfs files per try is slow in TCG.
until grep -q ACTIVE "$port/state" 2>/dev/null && grep -qs "$ipv4_gid" "$port"/gids/[0-9] "$port"/gids/1?; do
  i=$((i + 1)); [ $i -le 600 ] || fail "{rxe} port 1 not ACTIVE with an IPv4-mapped GID after 60 s"
  sleep 0.1
done
active_mtu=$(ibv_devinfo -d {rxe} | grep -o 'active_mtu:.*' | tr -s ' \t' ' ')
uptime=$(cut -d' ' -f1 /proc/uptime)
mark "{rxe} ready at guest uptime $uptime s: port $(cat "$port/state"), netdev MTU {mtu}, $active_mtu"
mkdir -p /tmp/home/.config/matplotlib
cd {workdir} || fail "cd {workdir}"
{exports}
mark "running: {display}"
( {command} ) </dev/null
rc=$?
echo "$rc" > "$RUN/rc.tmp" && mv "$RUN/rc.tmp" "$RUN/rc"
mark "command exited with $rc"
sync
"""


def guest_script(opts: Options, run_dir: Path, workdir: Path, env: dict[str, str]) -> str:
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    display = shell_command(opts.command).replace("\\", "\\\\").replace('"', '\\"')
    display = display.replace("$", "\\$").replace("`", "\\`")
    return GUEST_SETUP.format(run=shlex.quote(str(run_dir)), mtu=opts.mtu, ip=GUEST_IP,
                              gateway=GUEST_GATEWAY, rxe=RXE_NAME, workdir=shlex.quote(str(workdir)),
                              exports=exports, display=display, command=shell_command(opts.command))


def guest_workdir(project_dir: Path, cwd: Path) -> Path:
    """CMD runs in the host's current directory when that is inside the project, else at its root."""
    cwd = cwd.resolve()
    return cwd if cwd == project_dir or project_dir in cwd.parents else project_dir


def qemu_command(opts: Options, kernel: Kernel, initrd: Path, run_dir: Path,
                 boot_image: Path | None = None) -> list[str]:
    for p in (opts.project_dir, opts.work_dir, run_dir):
        if re.search(r"[\s,]", str(p)):
            raise RunnerError(f"path {p} contains whitespace or a comma, which the kernel command "
                              f"line and QEMU's -virtfs cannot carry")
    append = (f"console=ttyS0 quiet panic=-1 umbra_project={opts.project_dir} "
              f"umbra_work={opts.work_dir} umbra_run={run_dir}")

    def share(path: Path, tag: str, readonly: bool) -> list[str]:
        ro = ",readonly=on" if readonly else ""
        return ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap{ro}"]

    return ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", opts.cpu,
            "-m", opts.mem, "-smp", str(opts.smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(boot_image or kernel.image), "-initrd", str(initrd), "-append", append,
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            *share(Path("/"), "hostroot", True),
            *share(opts.project_dir, "project", False),
            *share(opts.work_dir, "work", False)]


# ------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    """What the host saw: used to choose the exit code and the message."""

    qemu_rc: int | None = None
    cmd_rc: int | None = None
    timed_out: bool = False
    boot_timed_out: bool = False
    started_at: float | None = None      # monotonic time the command started in the guest
    setup_failure: str | None = None
    qemu_error: str = ""


def exit_code(outcome: Outcome) -> int:
    if outcome.cmd_rc is not None:
        return outcome.cmd_rc
    if outcome.timed_out:
        return EXIT_TIMEOUT
    if outcome.started_at is None:
        return EXIT_BOOT_FAILURE
    return EXIT_GUEST_LOST


def describe(outcome: Outcome, opts: Options) -> str:
    code = exit_code(outcome)
    if outcome.cmd_rc is not None:
        return f"command exited with {code}"
    if code == EXIT_TIMEOUT:
        phase = "while the command ran" if outcome.started_at is not None else "before the command started"
        return f"TIMEOUT after {opts.timeout:g} s {phase} (exit {EXIT_TIMEOUT})"
    if code == EXIT_BOOT_FAILURE:
        if outcome.boot_timed_out:
            why = f"the command had not started after {opts.boot_timeout:g} s"
        elif outcome.setup_failure:
            why = outcome.setup_failure
        elif outcome.qemu_error:
            why = f"qemu exited with {outcome.qemu_rc}: {outcome.qemu_error.strip()}"
        else:
            why = f"the guest stopped (qemu exit {outcome.qemu_rc}) before the command started"
        return f"BOOT FAILURE: {why} (exit {EXIT_BOOT_FAILURE})"
    return (f"GUEST LOST: the guest stopped (qemu exit {outcome.qemu_rc}) after the command started "
            f"without reporting its exit code (exit {EXIT_GUEST_LOST})")


def _say(msg: str) -> None:
    print(f"softroce-run: {msg}", file=sys.stderr, flush=True)


class _Terminated(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def boot(opts: Options, kernel: Kernel, initrd: Path, run_dir: Path, log_path: Path,
         boot_image: Path | None = None) -> Outcome:
    """Run QEMU, stream (or collect) the console, watch for the guest's markers and the deadlines."""
    outcome = Outcome()
    t0 = time.monotonic()
    cmd = qemu_command(opts, kernel, initrd, run_dir, boot_image)
    (run_dir / "qemu.cmd").write_text(shell_command(cmd) + "\n")
    err_path = run_dir / "qemu.stderr"
    with err_path.open("wb") as err, log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
        except OSError as exc:
            raise RunnerError(f"cannot start qemu-system-x86_64: {exc}") from exc
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        pending = b""
        in_command = False  # --quiet prints only the lines between the guest's run markers
        try:
            while True:
                now = time.monotonic()
                if now - t0 > opts.timeout:
                    outcome.timed_out = True
                    break
                if outcome.started_at is None and now - t0 > opts.boot_timeout:
                    outcome.boot_timed_out = True
                    break
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunk = chunk.replace(b"\r\n", b"\n")
                log.write(chunk)
                log.flush()
                if not opts.quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    pos = line.find(MARK)
                    if pos < 0:
                        if opts.quiet and in_command:
                            sys.stdout.buffer.write(raw + b"\n")
                            sys.stdout.flush()
                        continue
                    text = line[pos + len(MARK):].strip()
                    if text.startswith("running:") and outcome.started_at is None:
                        outcome.started_at = time.monotonic()
                        in_command = True
                    elif text.startswith("command exited with"):
                        in_command = False
                    elif text.startswith("setup failed:") and outcome.setup_failure is None:
                        outcome.setup_failure = text
        finally:
            _stop(proc)
        if pending and (not opts.quiet or in_command):
            sys.stdout.buffer.write(b"\n")  # the console's last line has no newline ("Power down")
            sys.stdout.flush()
        outcome.qemu_rc = proc.returncode
    outcome.qemu_error = err_path.read_text(errors="replace")[-2000:]
    rc_file = run_dir / "rc"
    if rc_file.is_file():
        try:
            outcome.cmd_rc = int(rc_file.read_text().strip())
        except ValueError:
            outcome.setup_failure = f"unreadable exit code file {rc_file}"
    return outcome


def prune_runs(runs: Path, max_age_s: float = 3 * 86400) -> None:
    """Drop run directories kept from failed runs once they are old (a live run's is fresh)."""
    now = time.time()
    for d in runs.iterdir():
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run(opts: Options) -> int:
    t0 = time.monotonic()
    run_dir: Path | None = None
    outcome = Outcome()
    log_path = Path("/dev/null")
    old_term = signal.signal(signal.SIGTERM, _on_signal)
    try:
        kernel = find_kernel(image=opts.kernel, version=opts.kernel_version)
        if shutil.which("qemu-system-x86_64") is None:
            raise RunnerError("qemu-system-x86_64 not found; install qemu-system-x86 (bash ci/setup.sh)")
        opts.work_dir.mkdir(parents=True, exist_ok=True)
        initrd = build_initramfs(kernel, opts.work_dir)
        boot_image = pvh_kernel(kernel, opts.work_dir) if opts.pvh else None
        prune_builds(opts.work_dir, {initrd} | ({boot_image} if boot_image else set()))
        runs = opts.work_dir / "runs"
        runs.mkdir(exist_ok=True)
        prune_runs(runs)
        run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
        log_path = run_dir / "console.log"
        workdir = guest_workdir(opts.project_dir, Path.cwd())
        env = guest_environment(opts, workdir, dict(os.environ), sys.stdout.isatty())
        (run_dir / "guest.sh").write_text(guest_script(opts, run_dir, workdir, env))
        how = "PVH" if boot_image else "bzImage"
        _say(f"booting {kernel.image.name} ({how}, TCG, {opts.smp} vCPU, {opts.mem}, MTU {opts.mtu}); "
             f"run dir {run_dir}")
        outcome = boot(opts, kernel, initrd, run_dir, log_path, boot_image)
    except RunnerError as exc:
        outcome.setup_failure = str(exc)
    except (_Terminated, KeyboardInterrupt) as exc:
        _say(f"interrupted ({exc or 'SIGINT'}); guest stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    code = exit_code(outcome)
    total = time.monotonic() - t0
    if outcome.started_at is not None:
        boot_s = outcome.started_at - t0
        timing = f"boot+setup {boot_s:.1f} s, command {total - boot_s:.1f} s, total {total:.1f} s"
    else:
        timing = f"total {total:.1f} s"
    failed = outcome.cmd_rc is None
    if failed and opts.quiet and outcome.started_at is None and run_dir is not None:
        print(tail(log_path), flush=True)  # the command's own output was already printed
    _say(f"{describe(outcome, opts)}; {timing}")
    if run_dir is not None:
        if failed or opts.keep_log:
            _say(f"console log and guest script kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: usage errors are 2, --help is 0
        return int(exc.code or 0)
    return run(opts)


if __name__ == "__main__":
    raise SystemExit(main())
