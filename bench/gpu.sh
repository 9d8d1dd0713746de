#!/usr/bin/env bash
# bench/gpu.sh: tdedup's GPU checks and load figures, on a machine with a CUDA GPU,
# Python and PyTorch installed, and no network. Run from anywhere; it works in the repo.
#
#   bash bench/gpu.sh                      # on the GPU machine
#   TDEDUP_GPU_DRYRUN=1 bash bench/gpu.sh  # the same steps on CPU (tests the script)
#
# Steps (each bounded; the whole run stays under TDEDUP_GPU_BUDGET seconds, default 450):
#   1. dependencies: every wheel in .whl/ (an ignored folder carried with the checkout)
#      whose module the interpreter lacks is installed into a private --target folder;
#   2. the device: torch must see CUDA (unless dry-run);
#   3. a model family: the corpus's MiniLM family when present, else bench/make_family.py
#      (a BERT masked-LM of TDEDUP_GPU_FAMILY_MB MB, a copy, a re-save, three fine-tunes
#      by real AdamW steps);
#   4. tests: `pytest -m gpu` and tests/test_device_decode.py (CUDA parameters included);
#   5. bench/load.py --device cuda: both layouts vs load_file(device="cuda") per model,
#      logical GB/s and peak device memory vs distinct bytes;
#   6. bench/load.py --device cpu on the same machine: both layouts vs load_file(pread).
# The log goes to stdout and, when $OUT is set, to $OUT/gpu.log (figures as JSON there too).
#
# Exit status: 0 every step passed; 3 a dependency is missing; 4 no CUDA device; 5 no
# model family; 1 a test or benchmark step failed or ran out of time (the summary says which).
#
# Environment: TDEDUP_GPU_PYTHON (default /opt/torch/.venv/bin/python3, else python3),
# TDEDUP_GPU_WHEELS (default .whl), TDEDUP_GPU_WORK (default /tmp/tdedup-gpu),
# TDEDUP_GPU_FAMILY_MB (default 160; 24 in dry-run), TDEDUP_GPU_REPEAT (default 3; 1 in
# dry-run), TDEDUP_GPU_BUDGET (default 450 s), TDEDUP_CORPUS (the corpus, if any).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
DRYRUN=${TDEDUP_GPU_DRYRUN:-0}
BUDGET=${TDEDUP_GPU_BUDGET:-450}
DEADLINE=$((START + BUDGET))
PY=${TDEDUP_GPU_PYTHON:-/opt/torch/.venv/bin/python3}
[[ -x $PY ]] || PY=$(command -v python3)
WHEELS=${TDEDUP_GPU_WHEELS:-$ROOT/.whl}
WORK=${TDEDUP_GPU_WORK:-/tmp/tdedup-gpu}
SITE=$WORK/site
if [[ $DRYRUN == 1 ]]; then
    DEVICE=cpu; FAMILY_MB=${TDEDUP_GPU_FAMILY_MB:-24}; REPEAT=${TDEDUP_GPU_REPEAT:-1}
else
    DEVICE=cuda; FAMILY_MB=${TDEDUP_GPU_FAMILY_MB:-160}; REPEAT=${TDEDUP_GPU_REPEAT:-3}
fi
RESULTS=${OUT:-$WORK/out}
mkdir -p "$WORK" "$RESULTS"
exec > >(tee -a "$RESULTS/gpu.log") 2>&1
TEE_PID=$!

export HOME=${HOME:-$WORK} HF_HOME=$WORK/hf MPLCONFIGDIR=$WORK/mpl
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    NO_COLOR=1 PYTHONDONTWRITEBYTECODE=1 PIP_ROOT_USER_ACTION=ignore

declare -a SUMMARY=()
FAILED=0

say() { printf '%s\n' "$*"; }
elapsed() { echo $(($(date +%s) - START)); }

# step NAME MAX_SECONDS CMD...: run CMD with a time limit of min(MAX, time left).
step() {
    local name=$1 max=$2 left limit t0 rc
    shift 2
    left=$((DEADLINE - $(date +%s)))
    limit=$((max < left ? max : left))
    if ((limit < 10)); then
        say "== $name: SKIPPED (only ${left}s of the ${BUDGET}s budget left)"
        SUMMARY+=("$name: skipped, out of time"); FAILED=1
        return 0
    fi
    say ""
    say "== $name (limit ${limit}s, at +$(elapsed)s)"
    t0=$(date +%s)
    rc=0
    timeout --signal=TERM --kill-after=10 "$limit" "$@" || rc=$?
    local took=$(($(date +%s) - t0))
    if ((rc == 0)); then
        SUMMARY+=("$name: ok (${took}s)")
    elif ((rc == 124 || rc == 137)); then
        SUMMARY+=("$name: TIMED OUT after ${took}s"); FAILED=1
    else
        SUMMARY+=("$name: FAILED, exit $rc (${took}s)"); FAILED=1
    fi
    say "-> $name: exit $rc in ${took}s"
}

finish() {
    local rc=$1
    say ""
    say "== summary (${DEVICE}, $(elapsed)s in all; log: $RESULTS/gpu.log)"
    local line
    for line in "${SUMMARY[@]}"; do say "  $line"; done
    say "exit $rc"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true  # the log is complete before we exit
    exit "$rc"
}

say "tdedup bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null || echo "${HOSTNAME:-?}"); repo $ROOT at" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))," \
    "dry-run: $DRYRUN, device: $DEVICE, budget: ${BUDGET}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || say "(no nvidia-smi)"

# -- 1. dependencies --------------------------------------------------------------------
say ""
say "== dependencies"
# wheel distribution name -> the module it provides
module_of() {
    case ${1,,} in
        pyyaml) echo yaml ;;
        charset_normalizer | charset-normalizer) echo charset_normalizer ;;
        *) echo "${1,,}" | tr - _ ;;
    esac
}
declare -a MISSING_WHEELS=()
shopt -s nullglob
for whl in "$WHEELS"/*.whl; do
    dist=$(basename "$whl"); dist=${dist%%-*}
    mod=$(module_of "$dist")
    if ! "$PY" -c "import $mod" 2>/dev/null; then MISSING_WHEELS+=("$whl"); fi
done
shopt -u nullglob
if ((${#MISSING_WHEELS[@]})); then
    say "installing ${#MISSING_WHEELS[@]} carried wheel(s) into $SITE:"
    for whl in "${MISSING_WHEELS[@]}"; do say "  $(basename "$whl")"; done
    rm -rf "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check \
            --target "$SITE" "${MISSING_WHEELS[@]}"
    else  # no pip in this interpreter: a wheel is a zip of what goes into site-packages
        say "(no pip: unpacking the wheels)"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" "${MISSING_WHEELS[@]}"
    fi
else
    say "every carried wheel's module is already importable"
fi
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" - <<'EOF'
import importlib, sys
need = ["torch", "numpy", "safetensors", "zstandard", "blake3", "gguf", "typer", "rich",
        "transformers", "pytest", "hypothesis", "tdedup"]
missing = []
for name in need:
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '')}")
    except Exception as e:  # noqa: BLE001 - report every failure the same way
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("missing: " + "; ".join(missing))
    print("hint: carry their wheels in .whl/ (see bench/gpu.sh's header)")
    sys.exit(1)
EOF
then
    SUMMARY+=("dependencies: MISSING"); finish 3
fi
SUMMARY+=("dependencies: ok")

# -- 2. the device ----------------------------------------------------------------------
if ! "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
elif sys.argv[1] == "cuda":
    print("error: torch sees no CUDA device (TDEDUP_GPU_DRYRUN=1 runs the steps on CPU)")
    sys.exit(1)
EOF
then
    SUMMARY+=("device: NO CUDA"); finish 4
fi

# -- 3. the model family ----------------------------------------------------------------
CORPUS=${TDEDUP_CORPUS:-${HOME:-/nonexistent}/.cache/tdedup-corpus}
if [[ -f $CORPUS/minilm/base/model.safetensors ]]; then
    say ""
    say "== family: the corpus's MiniLM family at $CORPUS"
    FAMILY_ARGS=(--corpus "$CORPUS")
    SUMMARY+=("family: corpus MiniLM")
else
    FAMILY=$WORK/family-${FAMILY_MB}mb
    step "family (make_family.py --mb $FAMILY_MB)" 150 \
        "$PY" bench/make_family.py "$FAMILY" --mb "$FAMILY_MB" --steps 3
    [[ -f $FAMILY/FAMILY.json ]] || finish 5
    FAMILY_ARGS=(--family "$FAMILY")
fi

# -- 4. tests ---------------------------------------------------------------------------
step "pytest -m gpu" 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
step "pytest tests/test_device_decode.py" 60 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_device_decode.py

# -- 5, 6. load benchmarks --------------------------------------------------------------
BUNDLES=$WORK/bundles-$(echo "${FAMILY_ARGS[*]}" | cksum | cut -d' ' -f1)
if [[ $DEVICE == cuda ]]; then
    step "bench/load.py --device cuda" 180 "$PY" bench/load.py "${FAMILY_ARGS[@]}" \
        --device cuda --layout both --repeat "$REPEAT" --bundle-dir "$BUNDLES" \
        --json "$RESULTS/load-cuda.json"
fi
step "bench/load.py --device cpu" 120 "$PY" bench/load.py "${FAMILY_ARGS[@]}" \
    --device cpu --layout both --repeat "$REPEAT" --bundle-dir "$BUNDLES" \
    --json "$RESULTS/load-cpu.json"

# -- figures, as a Markdown table for bench/RESULTS.md ------------------------------------
say ""
say "== figures (from $RESULTS/load-*.json)"
"$PY" - "$RESULTS" <<'PYEOF' || true
import json, pathlib, sys
rows, d = [], None
for f in sorted(pathlib.Path(sys.argv[1]).glob("load-*.json")):
    d = json.loads(f.read_text())
    for side, v in d["sides"].items():
        rows.append(f"| {d['device']} | {side} | {v['median_s'] * 1e3:.1f} | "
                    f"{v['gb_per_s']:.2f} | {v['peak_bytes'] / 1e6:.1f} MB = "
                    f"{v['peak_x_distinct']:.2f}x | {v.get('ratio_to_ref', 1.0):.2f} |")
if d is None:
    print("(no figures)")
else:
    print(f"distinct tensor bytes {d['distinct_bytes'] / 1e6:.1f} MB of "
          f"{d['tensor_bytes'] / 1e6:.1f} MB, repeat {d['repeat']}")
    print("| device | side | median ms | GB/s logical | peak memory (x distinct) "
          "| time / reference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
PYEOF

finish "$FAILED"
