#!/usr/bin/env bash
# Builds the Go programs tfcrypt depends on, one small module per program family under
# tools/<name>/ (go.mod pins the version, go.sum its hashes, `tool` directives name the
# programs). Binaries go to a cache outside git, keyed by a hash of go.mod+go.sum, so a
# rerun is a no-op and a version bump rebuilds:
#   ${TFCRYPT_GO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/tfcrypt/go-bin}/<name>-<hash>/<program>
# netns_lab/gobin.py computes the same path. A failed build is one line naming the module
# and the Go error (the whole log is kept beside it), and the script exits non-zero.
# A module may hold tools/<name>/ldflags: one line passed as `go build -ldflags` (e.g.
# kube-apiserver needs its version stamped with -X); it is part of the cache key.
# A module may hold tools/<name>/rename: lines "<built> <cached>" (# comments allowed)
# renaming a built binary in the cache, for programs whose package directory is not the
# name they are run by (golang.zx2c4.com/wireguard builds "wireguard", run as
# "wireguard-go"); it is part of the cache key too.
# Usage: scripts/build-go.sh [name ...]   (default: every tools/*/go.mod)
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${TFCRYPT_GO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/tfcrypt/go-bin}
if ! command -v go >/dev/null; then
    echo "build-go: go not found on PATH (the Go toolchain builds tools/*; Go >= 1.24 is needed for tool directives)" >&2
    exit 1
fi

if [ $# -gt 0 ]; then
    modules=("$@")
else
    modules=()
    for m in tools/*/go.mod; do modules+=("$(basename "$(dirname "$m")")"); done
fi

if ! command -v gcc >/dev/null; then
    echo "build-go: gcc not found (SPIRE's sqlite datastore is built with cgo): apt-get install gcc" >&2
    exit 1
fi

mkdir -p "$cache"
for name in "${modules[@]}"; do
    dir=tools/$name
    if [ ! -f "$dir/go.mod" ] || [ ! -f "$dir/go.sum" ]; then
        echo "build-go: tools/$name: no go.mod/go.sum" >&2
        exit 1
    fi
    keyfiles=("$dir/go.mod" "$dir/go.sum")
    ldflags=()
    if [ -f "$dir/ldflags" ]; then
        keyfiles+=("$dir/ldflags")
        ldflags=(-ldflags "$(grep -v '^#' "$dir/ldflags" | paste -sd' ')")
    fi
    renames=()
    if [ -f "$dir/rename" ]; then
        keyfiles+=("$dir/rename")
        while read -r from to rest; do
            case $from in ''|'#'*) continue ;; esac
            if [ -z "$to" ] || [ -n "$rest" ] || [[ $from == */* ]] || [[ $to == */* ]]; then
                echo "build-go: tools/$name/rename: '$from $to $rest' is not '<built> <cached>'" >&2
                exit 1
            fi
            renames+=("$from" "$to")
        done <"$dir/rename"
    fi
    hash=$(cat "${keyfiles[@]}" | sha256sum | cut -c1-16)
    out=$cache/$name-$hash
    if [ -f "$out/.complete" ]; then
        echo "build-go: tools/$name up to date ($out)"
        continue
    fi
    echo "build-go: building tools/$name into $out (a first build can take minutes)"
    start=$(date +%s)
    tmp=$(mktemp -d "$cache/.$name-$hash.XXXXXX")
    log=$cache/$name-$hash.log
    # cgo: SPIRE's sqlite datastore needs it; -trimpath keeps build paths out of binaries.
    if ! (cd "$dir" && CGO_ENABLED=1 go build -trimpath -buildvcs=false "${ldflags[@]}" -o "$tmp/" tool) >"$log" 2>&1; then
        rm -rf "$tmp"
        # the Go error on one line: its lines joined, without download progress
        err=$(grep -v -e '^go: downloading' -e '^#' "$log" | sed 's/^[[:space:]]*//' \
              | grep . | head -5 | paste -sd' ' | cut -c1-400 || true)
        echo "build-go: FAILED tools/$name: ${err:-go build failed} (full log: $log)" >&2
        exit 1
    fi
    for ((i = 0; i < ${#renames[@]}; i += 2)); do
        if [ ! -f "$tmp/${renames[i]}" ]; then
            rm -rf "$tmp"
            echo "build-go: FAILED tools/$name: rename: go build made no ${renames[i]} (tools/$name/rename)" >&2
            exit 1
        fi
        mv "$tmp/${renames[i]}" "$tmp/${renames[i+1]}"
    done
    touch "$tmp/.complete"
    rm -rf "$out"
    mv "$tmp" "$out"
    # Older builds of this module are unreachable once go.mod/go.sum changed.
    for old in "$cache/$name"-*; do
        [ "$old" = "$out" ] || [ "$old" = "$log" ] || rm -rf "$old"
    done
    echo "build-go: built tools/$name in $(( $(date +%s) - start ))s: $(ls "$out" | tr '\n' ' ')"
done
