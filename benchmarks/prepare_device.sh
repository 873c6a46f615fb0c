#!/usr/bin/env bash
# Fill the git-ignored folder .whl/ with every wheel the bare GPU machine lacks, then check them.
#
#   bash benchmarks/prepare_device.sh          # run HERE (network to PyPI), before the GPU run
#   bash benchmarks/prepare_device.sh label    # only rewrite .whl/COMMIT (no network): after the last edit
#
# The GPU machine (x86-64, CPython 3.12, no network) has torch, triton, transformers, peft, numpy,
# packaging, psutil and tqdm, but no deepspeed, hjson, pydantic or liger-kernel. PyPI has DeepSpeed only
# as an sdist, so it is built here into a py3-none-any wheel without compiled ops (DS_BUILD_OPS=0; the
# benchmark uses none: torch's AdamW is the client optimizer). Everything else is downloaded as a CPython
# 3.12 manylinux x86-64 (or pure-Python) wheel. One version of each; stale files are removed. The whole
# working tree plus .whl travels to the GPU machine under a 64 MiB limit, so the size is checked.
# benchmarks/gpu_run.sh installs these with `pip install --no-index --no-deps --target /tmp/site`.
# Last, .whl/COMMIT records the commit the device's rows are to name (the copy there has no git metadata):
# git's short HEAD, whether the working tree that travels differs from it, and the hash of its sources
# (benchmarks/gpu_lib.sh commit_record). On the device code_label uses it only while the sources still hash
# the same, so an edit after this script makes the rows say tree-<hash> again: run `... label` after it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=$ROOT/.whl
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
source benchmarks/gpu_lib.sh

# write_commit: .whl/COMMIT from the working tree as it is now (commit_record), said in one line.
write_commit() {
  mkdir -p "$DEST"
  if ! commit_record "$ROOT" > "$DEST/COMMIT.tmp"; then
    rm -f "$DEST/COMMIT.tmp" "$DEST/COMMIT"
    echo "== .whl/COMMIT not written: $ROOT is not a git checkout (the device's rows will say tree-<hash>)"
    return 0
  fi
  mv "$DEST/COMMIT.tmp" "$DEST/COMMIT"
  echo "== .whl/COMMIT: $(tr '\n' ' ' < "$DEST/COMMIT")"
}

case "${1:-}" in
  "") ;;
  label) write_commit; exit 0 ;;
  *) echo "prepare_device.sh: unknown argument ${1} (none, or label)" >&2; exit 2 ;;
esac

DEEPSPEED=deepspeed==0.19.8
# deepspeed's runtime requirements that the GPU image may lack, pydantic's own, and the Liger baseline.
BINARY=(
  hjson==3.1.0
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing-extensions==4.16.0
  einops==0.8.2
  msgpack==1.2.4
  py-cpuinfo==9.0.0
  ninja==1.13.2
  liger-kernel==0.8.5
)
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform any)
MAX_MIB=40   # leaves room for the working tree under the 64 MiB transfer limit

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

echo "== deepspeed: build a py3-none-any wheel without ops"
if ls "$DEST"/deepspeed-0.19.8-py3-none-any.whl >/dev/null 2>&1; then
  cp "$DEST"/deepspeed-0.19.8-py3-none-any.whl "$stage"/
  echo "   reusing .whl/deepspeed-0.19.8-py3-none-any.whl"
else
  # --no-build-isolation: setup.py imports torch (the CPU build here is enough with DS_BUILD_OPS=0).
  DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
    "$DEEPSPEED" -w "$stage"
fi
ls "$stage"/deepspeed-*-py3-none-any.whl >/dev/null

echo "== downloading ${#BINARY[@]} wheels for CPython 3.12 manylinux x86-64"
"$PY" -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$stage" "${BINARY[@]}"

echo "== checks"
"$PY" - "$stage" <<'EOF'
import sys, zipfile, pathlib
stage = pathlib.Path(sys.argv[1])
wheels = sorted(stage.glob("*.whl"))
names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
dupes = {n for n in names if names.count(n) > 1}
assert not dupes, f"more than one version of {dupes}"
ds = [w for w in wheels if w.name.startswith("deepspeed-")][0]
with zipfile.ZipFile(ds) as z:
    so = [n for n in z.namelist() if n.endswith((".so", ".pyd"))]
    assert not so, f"deepspeed wheel carries compiled ops {so[:3]}"
    info = [n for n in z.namelist() if n.endswith("git_version_info_installed.py")]
    text = z.read(info[0]).decode() if info else ""
    ops = [l for l in text.splitlines() if l.startswith(("installed_ops", "accelerator_name"))]
    print("   deepspeed wheel:", ds.name, "| " + " | ".join(o[:90] for o in ops))
for w in wheels:
    tag = w.name[:-4].split("-")[-3:]
    ok = tag[0] in ("py3", "cp312", "py2.py3") and (tag[2] == "any" or "x86_64" in tag[2])
    assert ok, f"{w.name} does not install on CPython 3.12 x86-64"
EOF

# Install them the way gpu_run.sh does, resolved for CPython 3.12 x86-64, into a throwaway folder.
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$stage/site" "${PLATFORM_ARGS[@]}" "$stage"/*.whl
for mod in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection einops msgpack cpuinfo \
           liger_kernel; do
  [ -d "$stage/site/$mod" ] || [ -f "$stage/site/$mod.py" ] || { echo "missing $mod after install" >&2; exit 1; }
done
find "$stage/site" -name '*.so' -path '*deepspeed*' | grep -q . && { echo "deepspeed installed compiled ops" >&2; exit 1; }
# Pure-Python import of deepspeed against this machine's torch (the compiled pydantic-core is for 3.12;
# this machine's own pydantic serves for the import check).
PYTHONPATH="$stage/site-ds" "$PY" - "$stage" <<'EOF' || { echo "deepspeed import check failed" >&2; exit 1; }
import os, shutil, sys, subprocess
stage = sys.argv[1]
os.makedirs(f"{stage}/site-ds", exist_ok=True)
shutil.copytree(f"{stage}/site/deepspeed", f"{stage}/site-ds/deepspeed")
r = subprocess.run([sys.executable, "-c", "import deepspeed, sys; print('   import deepspeed', deepspeed.__version__, "
                    "'from', deepspeed.__file__.replace(sys.argv[1], '<stage>'))", stage],
                   env=dict(os.environ, PYTHONPATH=f"{stage}/site-ds", DS_ACCELERATOR="cpu"),
                   capture_output=True, text=True)
print(r.stdout.strip())
sys.exit(r.returncode or (0 if "<stage>" in r.stdout else 1))
EOF

# The compiled wheels against a real CPython 3.12, when this machine has one (pyenv often does).
PY312=
for cand in "$(command -v python3.12 2>/dev/null)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "" 2>/dev/null; then PY312=$cand; break; fi
done
if [ -n "$PY312" ]; then
  "$PY312" -S -c "
import sys; sys.path.insert(0, '$stage/site')
import pydantic, pydantic_core, hjson, msgpack, einops, cpuinfo, typing_inspection
class M(pydantic.BaseModel):
    x: int = 0
assert M(x='3').x == 3
print('   CPython', sys.version.split()[0], 'imports pydantic', pydantic.__version__, '+ core', pydantic_core.__version__,
      'hjson msgpack einops cpuinfo')" || { echo "the cp312 wheels fail on CPython 3.12" >&2; exit 1; }
else
  echo "   (no python3.12 here: the cp312 wheels were resolved by tag only)"
fi

# Tokenizer and config of the SmolLM2 asset, without its weights, for GPU tests that build random-weight
# models with SmolLM2's tokenizer (gpu_run.sh points LLM2VEC_ENGINE_CACHE at it).
HF=$(PYTHONPATH=$ROOT "$PY" -c "from engine.assets import local_path; print(local_path('smollm2-135m'))")
if [ ! -f "$HF/.complete" ]; then
  echo "== fetching the SmolLM2 asset once (python -m engine.assets fetch smollm2-135m)"
  PYTHONPATH=$ROOT "$PY" -m engine.assets fetch smollm2-135m >/dev/null
fi
mkdir -p "$stage/assets/smollm2-135m/hf"
for f in .complete config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
         chat_template.jinja; do
  [ -f "$HF/$f" ] && cp "$HF/$f" "$stage/assets/smollm2-135m/hf/"
done

mkdir -p "$DEST"
rm -rf "$DEST"/*.whl "$DEST"/assets
cp "$stage"/*.whl "$DEST"/
cp -r "$stage/assets" "$DEST"/
write_commit
echo "== .whl/ now holds:"
ls -l "$DEST" | awk 'NR>1 {printf "   %8.1f KiB  %s\n", $5/1024, $9}'
echo "   assets/smollm2-135m/hf: $(ls -A "$DEST/assets/smollm2-135m/hf" | tr '\n' ' ')"
bytes=$(du -sb "$DEST" | cut -f1)
tree=$(git -C "$ROOT" ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf "== .whl/ total %.2f MiB (wheels + tokenizer asset); working tree (tracked + untracked, not ignored) %.2f MiB\n" \
  "$(echo "$bytes / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)"
if [ "$bytes" -gt $((MAX_MIB * 1048576)) ]; then
  echo ".whl/ exceeds $MAX_MIB MiB" >&2
  exit 1
fi
echo "OK: carry .whl to the GPU run (run tool: carry=[\".whl\"])"
