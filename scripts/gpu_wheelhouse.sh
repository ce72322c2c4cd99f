#!/usr/bin/env bash
# Build a folder of wheels for a GPU machine that has a CUDA torch, Python 3.12 x86-64 and no internet,
# so that `bash bench/gpu_check.sh` (and training) can install what it lacks offline:
#
#   bash scripts/gpu_wheelhouse.sh [DIR]          # default DIR: .whl (git-ignored); ~51 MB
#   # there:  python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl  (gpu_check.sh does it)
#
# The versions are those of the environment running it (the project installed: the ones the tests ran
# with). Binary wheels are fetched for CPython 3.12 manylinux x86-64; deepspeed has no wheel on PyPI
# and is built locally from its sdist with DS_BUILD_OPS=0 (pure Python: its CUDA ops compile on first
# use, none of them is needed for ZeRO with torch's AdamW), antlr4-python3-runtime likewise (sdist
# only). wandb is left out (~20 MB; the trainer runs without it). Every wheel's requirements are
# checked against the carried wheels plus the packages the GPU image already holds (PRESENT below);
# a missing one stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
LIMIT_MB=60

# What the GPU image lacks (and the project needs): distribution names, versions taken from this environment.
CARRY=(diffusers deepspeed hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand peft accelerate
       torchao av ftfy wcwidth pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)
# On the GPU image already (its package list), as far as the carried wheels need them.
PRESENT="numpy packaging psutil pyyaml torch huggingface-hub safetensors einops msgpack ninja py-cpuinfo tqdm
         filelock regex requests pillow transformers zipp nvidia-ml-py"
# Required by a carried wheel's metadata but never imported on Python 3.12.
UNUSED="importlib-metadata"
SDIST_ONLY="deepspeed antlr4-python3-runtime"

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
binary=()
for name in "${CARRY[@]}"; do
    pin="$name==$(version "$name")"
    if [[ " $SDIST_ONLY " == *" $name "* ]]; then
        echo "building $pin from its sdist"
        DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
            --no-binary "$name" -w "$DIR" "$pin"
    else
        binary+=("$pin")
    fi
done
echo "downloading ${#binary[@]} wheels for CPython 3.12 manylinux x86-64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "${binary[@]}"

# Every requirement of every carried wheel is carried, on the image, or unused on 3.12.
"$PY" - "$DIR" "$PRESENT $UNUSED" <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

folder, known = Path(sys.argv[1]), {canon(n) for n in sys.argv[2].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
wheels = sorted(folder.glob("*.whl"))
carried = {canon(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and canon(req.name) not in carried | known:
                missing.append(f"{w.name} needs {req}")
if missing:
    sys.exit("not carried and not on the GPU image:\n  " + "\n  ".join(missing)
             + "\nadd them to CARRY (or PRESENT if the image has them) in scripts/gpu_wheelhouse.sh")
print(f"requirements: every one of {len(wheels)} wheels' needs is carried or on the image")
EOF

size_mb=$(du -sm "$DIR" | cut -f1)
ls -1 "$DIR"
echo "$DIR: $(ls "$DIR"/*.whl | wc -l) wheels, ${size_mb} MB (limit ${LIMIT_MB} MB)"
if (( size_mb > LIMIT_MB )); then
    echo "the wheelhouse is over ${LIMIT_MB} MB: it travels with the working tree; drop a wheel" >&2
    exit 1
fi
