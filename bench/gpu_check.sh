#!/usr/bin/env bash
# One call on a bare H100/H200 machine (torch and triton installed, nothing downloadable, this
# package not installed), under 9 minutes. Run from anywhere:
#
#   FASTVIT_STYLE_GIT_COMMIT=<commit> bash bench/gpu_check.sh OUTDIR [all|kernels|model]
#
# <commit>: `git rev-parse HEAD` of a clean tree (the copy on the GPU machine has no .git to read it
# from; the tree travels as it is). Checked for 40 hex digits; where .git exists it is read from there
# instead. Every JSON also records a hash of fastvit_style/ and kernels/ sources.
#   all      (default) the best single call: issue 7's core GPU tests and shared-attention sweep, then
#            issue 5's workloads of base (official compiled training first), then the profile
#   kernels  issue 7: core tests, the whole sweep, the other kernel and op tests, tiles, profile
#   model    issue 5: its workloads with every compiled variant, model tests, micro-benchmarks
# The steps, their caps and expected durations: bench/gpu_plan.py (`python3 bench/gpu_plan.py all
# --table`) and bench/README.md, "Time plan".
#
# Wheels in .whl/ (carried: `run(carry=[".whl"])`; xformers for the sweep's and the benchmark's
# xformers rows, see bench/README.md) are installed into a temporary folder first.
#
# OUTDIR stays flat and small (a device call brings back at most 8 files): the bench JSON and PNG,
# the sweep JSONs, the profile JSON, the micro-benchmark JSON and logs.tar.gz (one log per step).
# Every step has its own timeout, cut to the time left, and a failing step does not stop the next one;
# every step writes its results as it goes, and the logs are packed every 20 s, so a call killed at
# its limit still brings back what it did.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [all|kernels|model]}
PART=${2:-all}
case $PART in all | kernels | model) ;; *) echo "part must be all, kernels or model, got $PART" >&2; exit 2 ;; esac
TOTAL=${GPU_CHECK_SECONDS:-540}  # the device tool stops a command at 600 s
START=$SECONDS
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)
# The temporary folders go with the script however it ends (the logs are packed into OUT as it runs).
cleanup() {
    [[ -n ${PACKER:-} ]] && { kill "$PACKER" 2>/dev/null; wait "$PACKER" 2>/dev/null; }
    rm -rf "$LOGS" ${SITE:+"$SITE"} ${COPY:+"${COPY%/repo}"}
}
trap cleanup EXIT
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The commit the results are recorded against: .git where the tree has one, else the caller's, if it is a
# full hash (report.git_commit keeps any other value as 'given' only; the sources hash still ties them).
if git rev-parse -q --verify HEAD >/dev/null 2>&1; then
    unset FASTVIT_STYLE_GIT_COMMIT
elif [[ ! ${FASTVIT_STYLE_GIT_COMMIT:-} =~ ^[0-9a-f]{40}$ ]]; then
    echo "[gpu_check] WARNING: FASTVIT_STYLE_GIT_COMMIT='${FASTVIT_STYLE_GIT_COMMIT:-}' is no 40-hex commit and" \
        "there is no .git: the results will name no commit" >&2
fi
# tests/conftest.py sets TRITON_INTERPRET=1 only when it is unset: an explicit 0 keeps the kernels on
# the hardware (the interpreter would run them in numpy on the CPU).
export TRITON_INTERPRET=0

say() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$LOGS/gpu_check.log"; }

left() { echo $((TOTAL - (SECONDS - START) - 15)); }  # 15 s kept for packing the logs

# step NAME CAP LEAST: the plan's command for NAME with a timeout of min(CAP, time left), its output in
# LOGS/NAME.log; skipped when fewer than LEAST seconds are left.
step() {
    local name=$1 cap=$2 least=$3 limit
    limit=$(left)
    ((cap < limit)) && limit=$cap
    if ((limit < least)); then
        say "$name: skipped, ${limit}s left, it needs ${least}s"
        return
    fi
    local command
    mapfile -d '' -t command < <(python3 bench/gpu_plan.py "$PART" --command "$name" --limit "$limit" --out "$OUT")
    set -- "${command[@]}"
    say "$name: timeout ${limit}s: $*"
    # SIGINT, not timeout's SIGTERM: pytest then still prints which tests failed and why, and Python
    # scripts unwind (their JSON is written after every row anyway).
    timeout -s INT -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 </dev/null
    local rc=$?
    say "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
    tail -n 30 "$LOGS/$name.log"
    pack_logs
}

# Packed to a temporary of this process's own (the periodic packer runs beside the steps) and renamed:
# a call killed mid-pack keeps the previous archive whole.
pack_logs() {
    tar -czf "$OUT/.logs-$BASHPID.tar.gz" -C "$LOGS" . 2>/dev/null
    mv -f "$OUT/.logs-$BASHPID.tar.gz" "$OUT/logs.tar.gz"
}

# fastvit_style.kernels is the top-level kernels/ folder, mapped by pyproject's package-dir: a plain
# PYTHONPATH does not do that mapping. Use an install if there is one, else install editable offline,
# else work in a temporary copy with kernels/ linked into the package.
importable() { PYTHONPATH=$PWD python3 -c "import fastvit_style.kernels" 2>/dev/null; }
if importable; then
    say "package: fastvit_style.kernels importable as is"
elif python3 -m pip install --no-deps --no-build-isolation --no-index -q -e . >"$LOGS/pip.log" 2>&1 && importable; then
    say "package: installed editable with pip (offline)"
else
    say "package: pip install -e . failed (see pip.log); using a temporary copy with kernels/ linked in"
    COPY=$(mktemp -d)/repo
    cp -a . "$COPY" && ln -sfn ../kernels "$COPY/fastvit_style/kernels" && cd "$COPY"
    importable && say "package: importable from $COPY" || say "package: fastvit_style.kernels NOT importable"
fi
SITE=
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    if python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
        say "wheels: installed $(ls .whl | tr '\n' ' ')"
    else
        say "wheels: install failed (see wheels.log)"
    fi
fi
export PYTHONPATH=$PWD${SITE:+:$SITE}

# The packer goes with the script: TERM ends its wait at once (a plain sleep would hold the trap for up
# to 20 s), and a pack it cuts short leaves only a temporary, removed at the end.
( trap 'exit' TERM; while :; do sleep 20 & wait $!; pack_logs; done ) >/dev/null 2>&1 &
PACKER=$!
python3 bench/gpu_plan.py "$PART" >"$LOGS/plan.tsv"
while IFS=$'\t' read -r name cap least; do
    step "$name" "$cap" "$least"
done <"$LOGS/plan.tsv"
kill "$PACKER"
wait "$PACKER" 2>/dev/null

say "done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOGS/gpu_check.log"
pack_logs
rm -f "$OUT"/.logs-*.tar.gz  # a pack cut short by a kill
