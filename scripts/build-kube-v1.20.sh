#!/usr/bin/env bash
# Provides the Kubernetes control plane the operator's end-to-end tests run
# against: kube-apiserver and kube-controller-manager v1.20.2, built once from
# Debian bookworm's `kubernetes` SOURCE package (Go dependencies vendored) with
# bookworm's golang-1.19, and etcd from Debian's etcd-server.
#
# Does nothing when both binaries are already in $KUBE_BIN_DIR, on PATH, or in
# the cache dir ($FLASHSALE_KUBE_CACHE, default ~/.cache/flashsale/kube-v1.20.2).
# Safe to re-run: every step leaves a marker and a rerun resumes after the last
# one that finished. As root it installs the Debian packages it needs (and adds a
# deb-src line for bookworm); otherwise it prints what to install and stops.
# Takes about 5 minutes on 2 cores. Prints the binaries' dir on stdout.
#
#   scripts/build-kube-v1.20.sh          find or build
#   scripts/build-kube-v1.20.sh --check  exit 0 when kube-apiserver and
#                                        kube-controller-manager are found
set -euo pipefail

VERSION=v1.20.2
CACHE=${FLASHSALE_KUBE_CACHE:-$HOME/.cache/flashsale/kube-$VERSION}
GO=/usr/lib/go-1.19/bin/go
GOCODE=/usr/share/gocode/src
PACKAGES=(golang-1.19-go etcd-server dpkg-dev golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
BINARIES=(kube-apiserver kube-controller-manager)

say() { echo "build-kube: $*" >&2; }
die() { say "error: $*"; exit 1; }

has_all() {
  local dir=$1 b
  for b in "${BINARIES[@]}"; do [ -x "$dir/$b" ] || return 1; done
}

have_etcd() { command -v etcd >/dev/null 2>&1 || [ -x "${KUBE_BIN_DIR:-/nonexistent}/etcd" ]; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
  say "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$@" >&2
}

# 1. Already there?
for dir in "${KUBE_BIN_DIR:-}" "$CACHE"; do
  if [ -n "$dir" ] && has_all "$dir"; then
    found=$dir
    break
  fi
done
if [ -z "${found:-}" ] && command -v kube-apiserver >/dev/null 2>&1 \
  && command -v kube-controller-manager >/dev/null 2>&1; then
  found=$(dirname "$(command -v kube-apiserver)")
fi

if [ "${1:-}" = --check ]; then
  [ -n "${found:-}" ] && exit 0
  say "kube-apiserver/kube-controller-manager $VERSION not found in \$KUBE_BIN_DIR, PATH or $CACHE"
  exit 1
fi

missing=()
[ -n "${found:-}" ] || {
  [ -x "$GO" ] || missing+=(golang-1.19-go)
  command -v dpkg-source >/dev/null 2>&1 || missing+=(dpkg-dev)
  [ -d "$GOCODE/github.com/modern-go/reflect2" ] || missing+=(golang-github-modern-go-reflect2-dev)
  [ -d "$GOCODE/github.com/json-iterator/go" ] || missing+=(golang-github-json-iterator-go-dev)
}
have_etcd || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
  if is_root && command -v apt-get >/dev/null 2>&1; then
    say "apt-get update"
    apt-get update >&2
    apt_install "${missing[@]}"
  else
    die "missing ${missing[*]}: run  sudo apt-get install -y ${missing[*]}  (Debian bookworm), then rerun $0"
  fi
fi
have_etcd || die "etcd is still missing: apt-get install -y etcd-server"

if [ -n "${found:-}" ]; then
  say "kube-apiserver and kube-controller-manager found in $found; etcd at $(command -v etcd || echo "$KUBE_BIN_DIR/etcd")"
  echo "$found"
  exit 0
fi

# 2. The source package, with a deb-src line for bookworm if apt has none.
mkdir -p "$CACHE/src"
cd "$CACHE/src"
if ! ls kubernetes_*.dsc >/dev/null 2>&1; then
  if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    is_root || die "apt has no deb-src line: add one for bookworm (see $0), apt-get update, rerun"
    say "adding /etc/apt/sources.list.d/debian-src.sources (deb-src bookworm bookworm-updates main)"
    cat >/etc/apt/sources.list.d/debian-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    say "apt-get update"
    apt-get update >&2 || die "apt-get update failed"
  fi
  say "apt-get source --download-only kubernetes/bookworm into $CACHE/src"
  apt-get source --download-only kubernetes/bookworm >&2 \
    || die "cannot fetch the kubernetes source package: needs a deb-src line for bookworm and apt-get update"
fi
tree=$CACHE/src/kubernetes
if [ ! -f "$tree/.extracted" ]; then
  rm -rf "$tree"
  say "dpkg-source -x $(ls kubernetes_*.dsc | head -1)"
  dpkg-source --no-check -x "$(ls kubernetes_*.dsc | head -1)" "$tree" >&2
  touch "$tree/.extracted"
fi
cd "$tree"

# 3. Trap: the vendored reflect2 1.0.1 crashes under Go >= 1.18; take Debian's
#    reflect2 1.0.2 and json-iterator 1.1.12 instead.
if [ ! -f .vendor-replaced ]; then
  say "replacing vendored reflect2 and json-iterator with Debian's ($GOCODE)"
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "vendor/$pkg"
    mkdir -p "vendor/$pkg"
    cp -rL "$GOCODE/$pkg/." "vendor/$pkg/"
    rm -f "vendor/$pkg/go.mod" "vendor/$pkg/go.sum"
  done
  sed -i -E 's#(github.com/modern-go/reflect2) v1\.0\.1#\1 v1.0.2#; s#(github.com/json-iterator/go) v1\.1\.[0-9]+#\1 v1.1.12#' \
    go.mod vendor/modules.txt
  touch .vendor-replaced
fi

# 4. Trap: module mode with -mod=vendor fails under go 1.19; build in GOPATH
#    mode as 1.20's hack/lib/init.sh does.
export GOPATH=$CACHE/gopath
export GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$tree" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
export PWD=$GOPATH/src/k8s.io/kubernetes
say "go: $($GO version)"

# 5. Trap: pkg/generated/openapi/zz_generated.openapi.go is not in the tarball;
#    generate it as Makefile.generated_files does.
openapi=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -s "$openapi" ]; then
  say "building openapi-gen"
  "$GO" build -o "$CACHE/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  say "collecting packages tagged +k8s:openapi-gen="
  inputs=$(grep -Rl --include='*.go' --exclude='*_test.go' '+k8s:openapi-gen=' pkg cmd plugin vendor \
    | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
    | xargs -n1 dirname | LC_ALL=C sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd, -)
  say "generating $openapi ($(echo "$inputs" | tr , '\n' | wc -l) packages)"
  "$CACHE/openapi-gen" \
    -i "$inputs" \
    -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi \
    -h hack/boilerplate/boilerplate.generatego.txt \
    -r "$CACHE/openapi-violations.report" >&2
  [ -s "$openapi" ] || die "openapi-gen wrote no $openapi"
fi

# 6. The two binaries, with the version clients see.
pkg=k8s.io/kubernetes/vendor/k8s.io
ldflags="-s -w"
for v in component-base/version client-go/pkg/version; do
  ldflags+=" -X $pkg/$v.gitVersion=$VERSION -X $pkg/$v.gitMajor=1 -X $pkg/$v.gitMinor=20"
  ldflags+=" -X $pkg/$v.gitTreeState=clean -X $pkg/$v.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done
for b in "${BINARIES[@]}"; do
  say "go build ./cmd/$b (GOPATH mode, CGO_ENABLED=0)"
  "$GO" build -ldflags "$ldflags" -o "$CACHE/$b.new" "./cmd/$b"
  mv "$CACHE/$b.new" "$CACHE/$b"
done
"$CACHE/kube-apiserver" --version >&2

# The tree and GOPATH are only needed to build; the go build cache stays.
if [ -z "${KEEP_KUBE_BUILD:-}" ]; then
  rm -rf "$CACHE/src" "$CACHE/gopath" "$CACHE/openapi-gen"
fi
say "built ${BINARIES[*]} $VERSION into $CACHE"
echo "$CACHE"
