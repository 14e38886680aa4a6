#!/usr/bin/env bash
# Installs everything Umbra needs on a fresh Debian machine of this kind: system packages for the
# Soft-RoCE guest (QEMU, Debian kernel, rdma-core, pyverbs, perftest), a Python 3.11 venv in .venv
# with the project and its test extras, and a .pth entry that makes Debian's pyverbs importable.
# Idempotent: a second run only checks. Set UMBRA_SKIP_APT=1 to skip the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 linux-image-amd64 rdma-core ibverbs-providers ibverbs-utils
              python3-pyverbs perftest busybox-static iproute2 kmod)

if [ "${UMBRA_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "ci/setup.sh: installing system packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY="${UMBRA_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "ci/setup.sh: Python 3.11 not found (set UMBRA_PYTHON)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.umbra-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# Debian's pyverbs matches the system libibverbs (PyPI's does not); expose only that package.
if [ -d /usr/lib/python3/dist-packages/pyverbs ]; then
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p .venv/debian-pyverbs
  ln -sfn /usr/lib/python3/dist-packages/pyverbs .venv/debian-pyverbs/pyverbs
  echo "$(pwd)/.venv/debian-pyverbs" > "$site/umbra-debian-pyverbs.pth"
fi
echo "ci/setup.sh: ready ($(.venv/bin/python --version))"
