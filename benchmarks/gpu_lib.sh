# What benchmarks/gpu_run.sh and gpu_rerun_train_step.sh share (sourced: functions and tables only, nothing runs).
#
# The code a run names (code_label): LLM2VEC_COMMIT when set, else git's short HEAD, else, on a device copy
# without git metadata, what .whl/COMMIT records (prepare_device.sh writes it: commit_record) when it describes
# these sources (its tree hash is theirs): the commit, "-dirty-<tree>" appended when the tree that travelled
# differed from it; else tree-<12 hex of a SHA-256 over every source file's path and content> (tree_hash).
#
# The time budget of gpu_run.sh. BUDGET seconds from START (bash's SECONDS) to the summary; the steps run in
# STEP_ORDER, each under `timeout --kill-after=KILL_S LIMIT`, so a step that ignores the TERM ends by
# LIMIT + KILL_S. Each step has a cap CAP[s] and a floor FLOOR[s] (0: none), the time it is guaranteed when its
# turn comes however long the steps before it ran. With R(s) = the sum over the steps after s that will run of
# FLOOR + KILL_S (KILL_S not counted for the summary, which is not killed), step s may run
#
#     LIMIT(s) = min(CAP[s], left - R(s) - KILL_S - KEEP(s)),   left = BUDGET - elapsed,
#
# KEEP(s) being what the first path of a supervised / SimCSE pair keeps for its partner (PAIR_KEEP_S, when
# the partner will run). By induction LIMIT(s) >= min(CAP[s], FLOOR[s]) for every step with a floor, provided
# BUDGET - (time before the first step) >= R(first step) + KILL_S: each step ends by LIMIT + KILL_S, which
# leaves R(s) = FLOOR(next) + KILL_S + R(next) for the rest. A step whose LIMIT falls under its least useful
# time (MIN_S[s], default MIN_STEP_S; min_for) is skipped, and steps.tsv says so ("no time left"). The floors of
# steps that will not run (GPU_RUN_SKIP, not in GPU_RUN_ONLY, off by default, or not in this structure's
# STEP_ORDER) are not kept.

KILL_S=10
MIN_STEP_S=15
PAIR_KEEP_S=120
PATH_MARGIN_S=10  # a train-step path's --budget-s is its step's LIMIT less this (gpu_run.sh's train_step)
SOURCE_DIRS=(engine llm2vec_kernels benchmarks tests configs)
declare -gA CAP=() FLOOR=() PARTNER=() MIN_S=() OFF=()  # plan_steps fills them
STEP_ORDER=()

# tree_hash ROOT: 12 hex digits of a SHA-256 over the path and SHA-256 of every .py, .yaml and .sh file under
# ROOT's SOURCE_DIRS (a missing folder is an error on stderr, not a silent gap in the hash).
tree_hash() {
  (cd "$1" && find "${SOURCE_DIRS[@]}" -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.sh' \) \
    -exec sha256sum {} + | LC_ALL=C sort -k 2 | sha256sum | cut -c1-12)
}

# travel_tree_hash ROOT: tree_hash of the source files that travel to the device (git's tracked and untracked,
# not ignored files under SOURCE_DIRS): what tree_hash gives on the device's copy, which has no ignored files.
travel_tree_hash() {
  (cd "$1" && git ls-files -z -co --exclude-standard -- "${SOURCE_DIRS[@]}" \
    | grep -zE '\.(py|yaml|sh)$' | while IFS= read -r -d '' f; do
        [ -f "$f" ] && [ ! -L "$f" ] && printf '%s\0' "$f"
      done | xargs -0 -r sha256sum | LC_ALL=C sort -k 2 | sha256sum | cut -c1-12)
}

# commit_record ROOT: what prepare_device.sh writes to .whl/COMMIT, three lines: "commit <git's short HEAD>",
# "dirty 0|1" (1: `git status --porcelain` lists a change, tracked or untracked: the tree that travels is not
# HEAD's) and "tree <travel_tree_hash>". Status 1 outside a git checkout.
commit_record() {
  local head dirty=0
  head=$(git -C "$1" rev-parse --short --verify -q HEAD 2>/dev/null) || return 1
  [ -n "$(git -C "$1" status --porcelain 2>/dev/null)" ] && dirty=1
  printf 'commit %s\ndirty %s\ntree %s\n' "$head" "$dirty" "$(travel_tree_hash "$1")"
}

# recorded_label ROOT: the label ROOT/.whl/COMMIT gives when it describes ROOT's sources (its tree is tree_hash
# ROOT): the commit, with "-dirty-<tree>" appended when dirty. Status 1 (nothing printed) without the file, or
# when the sources changed after it was written (then the commit would name other code).
recorded_label() {
  local f=$1/.whl/COMMIT commit dirty tree
  [ -f "$f" ] || return 1
  commit=$(awk '$1 == "commit" {print $2}' "$f")
  dirty=$(awk '$1 == "dirty" {print $2}' "$f")
  tree=$(awk '$1 == "tree" {print $2}' "$f")
  [ -n "$commit" ] && [ -n "$tree" ] && [ "$tree" = "$(tree_hash "$1")" ] || return 1
  if [ "$dirty" = 1 ]; then echo "$commit-dirty-$tree"; else echo "$commit"; fi
}

# code_label ROOT: what the CSV rows' commit column says (see the top of this file).
code_label() {
  if [ -n "${LLM2VEC_COMMIT:-}" ]; then
    echo "$LLM2VEC_COMMIT"
  elif git -C "$1" rev-parse --short --verify -q HEAD 2>/dev/null; then
    :
  elif recorded_label "$1"; then
    :
  else
    echo "tree-$(tree_hash "$1")"
  fi
}

# gpu_test_files ROOT: the test files (tests/test_*.py, relative to ROOT) that mark a test `gpu` (a line
# `@pytest.mark.gpu` or `pytestmark = ... pytest.mark.gpu`; pytest.ini; tests/conftest.py skips such tests
# without CUDA): the GPU step collects these only.
gpu_test_files() {
  (cd "$1" && grep -lE '^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)' tests/test_*.py 2>/dev/null)
}

# plan_steps ARCH: STEP_ORDER, CAP, FLOOR, MIN_S, OFF and PARTNER of gpu_run.sh for the structure ARCH.
#
# The main comparison comes first: llm2vec's recipe (`reference`) and `engine-auto`, each up to GPU_RUN_PATH_S
# (130 s; 150 s for another structure, whose steps are longer). 130 s is what 5 warm-up + 20 timed 7B steps at
# ~2.5 s need, with the imports (~10 s), the model build (~20 s), the stop rule's margin (3 x the longest step)
# and the profiled step: --budget-s 120, from the process's start. engine-auto's floor is its whole cap, so
# the reference can never leave it short. Then the bf16 kernel checks (cap 110, floor 60: 55 s for three
# kernels on the 2026-11-26 H200), the GPU tests (35, floor 30: 28 s there), attention (150, floor 30: it stops
# starting cases at its --budget-s) and masked CE (60, floor 35: it has no budget and took 23 s there). The
# harness's ZeRO-3 `engine` MNTP path follows with what is left (cap GPU_RUN_PATH_S, no floor, skipped under
# 60 s: a 7B build alone takes ~20 s); `reference-zero3`, the older ablation, is off by default (OFF: it runs
# only when GPU_RUN_ONLY names it). Then the big-batch step (GPU_RUN_BIGBATCH_S, 150 s; skipped under 60 s, its
# --budget-s being its limit less 15), the supervised and SimCSE pairs (GPU_RUN_CONTRASTIVE_PATH_S, 240 s: 5
# warm-up + 20 timed supervised steps of the ZeRO-3 reference at ~9 s on an H200, the build included; the first
# of a pair keeps PAIR_KEEP_S for its partner), the contrastive benchmark (45 s) and the summary (floor 20 s,
# its timeout). The floors fit the default budget: for Mistral-7B, with the install's ~40 s and every step
# running into its timeout and kill (the worst case), 40 + (130 + 10) x 2 + 70 + 40 + 40 + 45 + 20 = 535 <= 555.
plan_steps() {
  local arch=$1 path_s
  path_s=${GPU_RUN_PATH_S:-$([ "$arch" = mistral-7b ] && echo 130 || echo 150)}
  declare -gA CAP=() FLOOR=() PARTNER=() MIN_S=() OFF=()
  STEP_ORDER=(train_step_mntp_reference train_step_mntp_engine-auto)
  CAP[train_step_mntp_reference]=$path_s FLOOR[train_step_mntp_reference]=0
  CAP[train_step_mntp_engine-auto]=$path_s FLOOR[train_step_mntp_engine-auto]=$path_s
  STEP_ORDER+=(correctness pytest_gpu bench_attention)
  CAP[correctness]=110 FLOOR[correctness]=60
  CAP[pytest_gpu]=35 FLOOR[pytest_gpu]=30
  CAP[bench_attention]=150 FLOOR[bench_attention]=30
  if [ "$arch" = mistral-7b ]; then
    STEP_ORDER+=(bench_masked_ce train_step_mntp_engine train_step_mntp_reference-zero3 bench_train_step_bigbatch)
    CAP[bench_masked_ce]=60 FLOOR[bench_masked_ce]=35
    local p
    for p in engine reference-zero3; do
      CAP["train_step_mntp_$p"]=$path_s MIN_S["train_step_mntp_$p"]=60
    done
    OFF[train_step_mntp_reference-zero3]=1
    CAP[bench_train_step_bigbatch]=${GPU_RUN_BIGBATCH_S:-150} MIN_S[bench_train_step_bigbatch]=60
    local stage
    for stage in supervised simcse; do
      STEP_ORDER+=("train_step_${stage}_reference-zero3" "train_step_${stage}_engine")
      CAP["train_step_${stage}_reference-zero3"]=${GPU_RUN_CONTRASTIVE_PATH_S:-240}
      CAP["train_step_${stage}_engine"]=${GPU_RUN_CONTRASTIVE_PATH_S:-240}
      PARTNER["train_step_${stage}_reference-zero3"]="train_step_${stage}_engine"
    done
    STEP_ORDER+=(bench_contrastive)
    CAP[bench_contrastive]=45
  fi
  STEP_ORDER+=(summary)
  FLOOR[summary]=20
}

# min_for NAME: the least limit NAME is started with (MIN_S, else MIN_STEP_S); under it the step is skipped.
min_for() {
  echo "${MIN_S[$1]:-$MIN_STEP_S}"
}

# will_run NAME: true unless GPU_RUN_SKIP names the step, or GPU_RUN_ONLY is set and does not, or (without
# GPU_RUN_ONLY) the step is off by default (OFF); the summary always runs.
will_run() {
  [ "$1" = summary ] && return 0
  [[ ",${GPU_RUN_SKIP:-}," == *",$1,"* ]] && return 1
  if [ -n "${GPU_RUN_ONLY:-}" ]; then
    [[ ",$GPU_RUN_ONLY," == *",$1,"* ]]
  else
    [ -z "${OFF[$1]:-}" ]
  fi
}

# skip_reason NAME: why will_run NAME is false, for the log and steps.tsv.
skip_reason() {
  if [[ ",${GPU_RUN_SKIP:-}," == *",$1,"* ]]; then echo "GPU_RUN_SKIP"
  elif [ -n "${GPU_RUN_ONLY:-}" ]; then echo "not in GPU_RUN_ONLY"
  else echo "off by default (GPU_RUN_ONLY=$1 runs it)"; fi
}

# reserve_after NAME: R(NAME), the floors (with their kill slack) of the steps after NAME that will run.
reserve_after() {
  local s seen=0 sum=0
  for s in "${STEP_ORDER[@]}"; do
    if [ "$seen" = 1 ] && will_run "$s" && [ "${FLOOR[$s]:-0}" -gt 0 ]; then
      sum=$((sum + FLOOR[$s]))
      [ "$s" = summary ] || sum=$((sum + KILL_S))
    fi
    [ "$s" = "$1" ] && seen=1
  done
  echo "$sum"
}

# elapsed: seconds since START.
elapsed() {
  echo $((SECONDS - START))
}

# limit_for NAME: LIMIT(NAME) in seconds (see the top of this file); under min_for NAME the step is skipped.
limit_for() {
  local keep=0 partner=${PARTNER[$1]:-}
  if [ -n "$partner" ] && will_run "$partner"; then keep=$PAIR_KEEP_S; fi
  local left=$((BUDGET - $(elapsed) - $(reserve_after "$1") - KILL_S - keep))
  local cap=${CAP[$1]:?"no cap for step $1"}
  echo $((cap < left ? cap : left))
}
