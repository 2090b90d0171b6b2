#!/usr/bin/env bash
# Validate and time shiftwise's CUDA path on one GPU, in one go (about four minutes):
#
#   1. shiftwise selftest --device cuda --json    every backend against F.conv2d, gradients, timing
#   2. pytest -m cuda tests                       the CUDA suite (tests marked cuda)
#   3. shiftwise bench --device cuda              the paper's layer, SLaK-T stages 1 and 4, densities 1
#                                                 and 0.25: PyTorch's depthwise conv, both shift-wise paths
#   4. benchmarks/cuda_auto_rule.py               the rule of backend="auto" on CUDA, from those timings
#
# Usage, from anywhere (it works in the repository root):
#
#   scripts/gpu_check.sh OUTDIR              run everything; logs and JSON into OUTDIR
#   scripts/gpu_check.sh --dry-run OUTDIR    set up and print the steps without running them
#
# The machine needs Python with PyTorch (CUDA) and pytest; Taichi, if missing, is installed from the
# wheels in .whl/ (scripts/fetch_gpu_wheels.sh downloads them where a package index is reachable), so
# no network is needed. Taichi and shiftwise are installed into a folder of their own (GPU_CHECK_SITE,
# default /tmp/site) put first on PYTHONPATH; the machine's own packages are left as they are.
#
# OUTDIR receives gpu_check.log (every step's output), summary.json (versions, GPU, each step's
# status and seconds) and the results, named after the GPU and the versions, e.g.
# bench-paper-h200-pt2.11-ti1.7.4.json. Exit status 0 when every step passed, 1 when one failed or
# ran past its time limit, 2 when the setup failed (nothing was run).
set -uo pipefail

usage() { echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
dry=0
case "${1:-}" in
    --dry-run) dry=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
[ "$#" -eq 1 ] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
cd "$root" || exit 2
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
log=$out/gpu_check.log
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
: >"$log"

say() { echo "gpu_check: $*" | tee -a "$log" >&2; }
setup_failed() { say "setup failed: $*"; exit 2; }

# ---- setup ----------------------------------------------------------------------------------------
export ENABLE_TAICHI_HEADER_PRINT=0 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$site" || setup_failed "cannot create $site"
if ! "$py" -c "import taichi" >/dev/null 2>&1; then
    ls .whl/taichi-*.whl >/dev/null 2>&1 ||
        setup_failed "Taichi is not installed and .whl/ holds no Taichi wheel (run scripts/fetch_gpu_wheels.sh where pip can download)"
    say "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        >>"$log" 2>&1 || setup_failed "pip could not install the wheels of .whl/ (see $log)"
fi
say "installing shiftwise from $root into $site"
had_build=0
[ -e "$root/build" ] && had_build=1
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root" >>"$log" 2>&1 || setup_failed "pip could not install shiftwise (see $log)"
[ "$had_build" -eq 1 ] || rm -rf "$root/build"  # the build's own scratch folder

# Taichi opens the CUDA driver as libcuda.so; where only libcuda.so.1 is installed, point it there.
cudalib=$("$py" - <<'EOF' 2>>"$log"
import ctypes
try:
    ctypes.CDLL("libcuda.so")
except OSError:
    import torch
    if torch.cuda.is_available():
        torch.cuda.init()
        for line in open("/proc/self/maps"):
            if "libcuda.so" in line:
                print(line.split()[-1])
                break
EOF
)
if [ -n "$cudalib" ]; then
    mkdir -p "$scratch/lib" && ln -sf "$cudalib" "$scratch/lib/libcuda.so"
    export LD_LIBRARY_PATH=$scratch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    say "libcuda.so -> $cudalib"
fi

# versions, the GPU, and the tag of the result files; python -P: the installed copy, not ./shiftwise
"$py" -P - "$scratch/env.json" >>"$log" 2>&1 <<'EOF' || setup_failed "shiftwise, Taichi or PyTorch does not import (see $log)"
import json, platform, re, subprocess, sys
import torch, taichi, shiftwise
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
driver = None
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    pass
slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "nogpu").lower().replace("nvidia", "")).strip("-")
tv, ti = torch.__version__.split("+")[0], ".".join(map(str, taichi.__version__))
env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "taichi": ti, "shiftwise": shiftwise.__version__, "shiftwise_path": shiftwise.__file__, "gpu": gpu,
       "capability": list(torch.cuda.get_device_capability(0)) if gpu else None, "driver": driver,
       "tag": f"{slug}-pt{'.'.join(tv.split('.')[:2])}-ti{ti}"}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
tag=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['tag'])" "$scratch/env.json")
gpu=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['gpu'] or '')" "$scratch/env.json")
[ -n "$gpu" ] || [ "$dry" -eq 1 ] || setup_failed "PyTorch sees no CUDA GPU"
say "GPU ${gpu:-none}; results tagged $tag"

# ---- steps ----------------------------------------------------------------------------------------
# step NAME SECONDS STDOUT_FILE COMMAND...: run COMMAND under a time limit; its stdout goes to
# STDOUT_FILE ("-": the log), its stderr to the log. Records "NAME status seconds" for the summary.
: >"$scratch/steps"
step() {
    local name=$1 limit=$2 dest=$3 rc start secs status
    shift 3
    say "[$name] (limit ${limit}s) $*"
    if [ "$dry" -eq 1 ]; then
        echo "$name dry-run 0" >>"$scratch/steps"
        return 0
    fi
    start=$(date +%s.%N)
    if [ "$dest" = "-" ]; then
        timeout -k 10 "$limit" "$@" >"$scratch/$name.out" 2>&1
        rc=$?
        cat "$scratch/$name.out" >>"$log"
    else
        timeout -k 10 "$limit" "$@" >"$dest" 2>"$scratch/$name.out"
        rc=$?
        cat "$scratch/$name.out" >>"$log"
    fi
    secs=$("$py" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
    case $rc in
        0) status=passed ;;
        124|137) status=timed-out ;;
        *) status=failed-rc$rc ;;
    esac
    echo "$name $status $secs" >>"$scratch/steps"
    say "[$name] $status after ${secs}s"
}
skip() {
    echo "$1 skipped 0" >>"$scratch/steps"
    say "[$1] skipped: $2"
}

if "$py" -P -m shiftwise selftest --help >/dev/null 2>&1; then
    step selftest 55 "$out/selftest-$tag.json" "$py" -P -m shiftwise selftest --device cuda --json
else
    skip selftest "this shiftwise has no selftest command"
fi

step pytest-cuda 100 - "$py" -P -m pytest -m cuda -q -p no:cacheprovider --junitxml="$out/pytest-cuda-$tag.xml" tests

impls=torch_depthwise,sw_decomposed,sw_fused,sw_auto
bench=("$py" -P -m shiftwise bench --device cuda --densities 1,0.25 --impls "$impls" --quiet --force)
step bench-paper 35 - "${bench[@]}" --preset paper -o "$out/bench-paper-$tag.json"
step bench-slak_t 35 - "${bench[@]}" --preset slak_t --cases s1,s4 -o "$out/bench-slak_t-$tag.json"

if [ -f benchmarks/cuda_auto_rule.py ]; then
    results=()
    for f in "$out/bench-paper-$tag.json" "$out/bench-slak_t-$tag.json"; do
        [ -f "$f" ] && results+=("$f")
    done
    if [ "${#results[@]}" -gt 0 ] || [ "$dry" -eq 1 ]; then
        step cuda-auto-rule 10 - "$py" benchmarks/cuda_auto_rule.py "${results[@]}" \
            -o "$out/cuda-auto-rule-$tag.json" --force
    else
        skip cuda-auto-rule "no bench results to read"
    fi
else
    skip cuda-auto-rule "benchmarks/cuda_auto_rule.py is missing"
fi

# ---- summary --------------------------------------------------------------------------------------
touch "$scratch/pytest-cuda.out"
"$py" - "$scratch/env.json" "$scratch/steps" "$out/summary.json" "$scratch/pytest-cuda.out" <<'EOF' | tee -a "$log"
import json, re, sys
env = json.load(open(sys.argv[1]))
steps = [dict(zip(("name", "status", "seconds"), line.split())) for line in open(sys.argv[2]) if line.strip()]
text = open(sys.argv[4], errors="replace").read()
tests = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|errors?|deselected)[^\n]*?)(?: =*)?$", text, re.M)
for s in steps:
    s["seconds"] = float(s["seconds"])
    if s["name"] == "pytest-cuda" and s["status"] == "passed" and not (tests and " passed" in tests[-1]):
        s["status"] = "failed-none-ran"  # every CUDA test skipped: the reasons are in the log
failed = [s["name"] for s in steps if s["status"] not in ("passed", "skipped", "dry-run")]
summary = {"env": env, "steps": steps, "pytest": tests[-1] if tests else None, "failed": failed}
json.dump(summary, open(sys.argv[3], "w"), indent=1)
print(f"\ngpu_check summary: {env['gpu'] or 'no GPU'}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
      f"Taichi {env['taichi']}, Python {env['python']}")
for s in steps:
    print(f"  {s['name']:<16} {s['status']:<14} {s['seconds']:7.1f} s")
print(f"  {'total':<16} {'':<14} {sum(s['seconds'] for s in steps):7.1f} s")
if summary["pytest"]:
    print(f"  CUDA suite: {summary['pytest']}")
print("  all steps passed" if not failed else f"  FAILED: {', '.join(failed)}")
sys.exit(1 if failed else 0)
EOF
rc=$?
say "logs and results in $out"
exit $rc
