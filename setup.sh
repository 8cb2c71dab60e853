#!/usr/bin/env bash
# Set up everything transformer.py and gpt.py need, idempotently: a C compiler for tinygrad's CPU
# backend, a virtual environment in .venv, and the Python packages. `make` runs this for you.
#   ./setup.sh          runtime + test dependencies
#   WITH_OPENCL=1 ./setup.sh   also PoCL, so tinygrad's OpenCL backend (DEV=CL) runs on the CPU
#   libLLVM 19 comes too: tinygrad's LLVM code generator (CPU:LLVM) is the default backend on a
#   CPU (see transformer.use_device); tinygrad 0.14 cannot use LLVM 14 or 15 (Debian 12 has 19).
#   WITH_LLVM=0 ./setup.sh skips it, and the CPU backend falls back to clang.
#   WITH_CHROMIUM=1 ./setup.sh also Chromium, the browser the tests open attention.html in
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
if [[ "$(uname -s)" == "Linux" ]]; then
  command -v clang >/dev/null || need_apt+=(clang)
  if [[ "${WITH_OPENCL:-0}" == "1" ]] && ! ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
    need_apt+=(pocl-opencl-icd)
  fi
  if [[ "${WITH_LLVM:-1}" == "1" ]]; then
    llvm_found=0
    for v in 16 17 18 19 20 21; do
      compgen -G "/usr/lib/*/libLLVM-$v.so" >/dev/null && llvm_found=1
    done
    if ((!llvm_found)); then
      # wanted, not needed: without root the default backend falls back to clang
      if [[ $(id -u) == 0 ]] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
        need_apt+=(libllvm19)
      else
        echo "setup: note: no libLLVM 16-21, so the CPU backend is clang, not the faster LLVM" \
             "(sudo apt-get install -y libllvm19 to add it)" >&2
      fi
    fi
  fi
  if [[ "${WITH_CHROMIUM:-0}" == "1" ]] && ! command -v chromium >/dev/null; then
    need_apt+=(chromium)
  fi
  if ((${#need_apt[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "setup: installing ${need_apt[*]} with apt-get" >&2
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
      echo "setup: installing ${need_apt[*]} with sudo apt-get" >&2
      sudo apt-get update -qq >/dev/null
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
      echo "setup: tinygrad needs ${need_apt[*]} here; install it first (Debian/Ubuntu:" \
           "sudo apt-get install -y ${need_apt[*]}), then run this again" >&2
      exit 1
    fi
  fi
elif [[ "$(uname -s)" == "Darwin" ]] && ! command -v clang >/dev/null; then
  echo "setup: tinygrad's CPU backend needs clang: run 'xcode-select --install', then this again" >&2
  exit 1
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
