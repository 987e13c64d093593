#!/usr/bin/env bash
# Fetches the GraphiQL page's assets from the npm registry, checks them
# against the registry's published integrity hashes, and writes them to
# api/src/transport/graphiql/, where the binary embeds them: /graphiql then
# needs no CDN. Run it to change versions (update the hashes with them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=api/src/transport/graphiql
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name version sha512-integrity (from https://registry.npmjs.org/<name>/<version>)
fetch() {
    local name=$1 version=$2 integrity=$3
    local tarball="$work/$name-$version.tgz"
    curl -fsSL "https://registry.npmjs.org/$name/-/$name-$version.tgz" -o "$tarball"
    local actual
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
    if [ "$actual" != "$integrity" ]; then
        echo "$name $version: integrity $actual, expected $integrity" >&2
        exit 1
    fi
    mkdir -p "$work/$name"
    tar -xzf "$tarball" -C "$work/$name"
}

fetch graphiql 3.8.3 'sha512-cuPDYtXVKV86Pu5PHBX642Odi/uVEE2y1Jxq5rGO/Qy1G2lRp7ZZ7a/T30RzxhuLSWo9zUbzq0P3U49//H0Ugw=='
fetch react 18.3.1 'sha512-wS+hAgJShR0KhEvPJArfuPVN1+Hz1t0Y6n5jLrGQbkb4urgPE/0Rve+1kMB1v/oWgHgm4WIcV+i7F2pTVj+2iQ=='
fetch react-dom 18.3.1 'sha512-5m4nQKp+rZRb09LNH59GM4BxTh9251/ylbKIbpe7TpGxfJ+9kv6BLkLBXIjjspbgbnIBNqlI23tRnTWT0snUIw=='

mkdir -p "$out"
cp "$work/graphiql/package/graphiql.min.js" "$out/graphiql.min.js"
cp "$work/graphiql/package/graphiql.min.css" "$out/graphiql.min.css"
cp "$work/react/package/umd/react.production.min.js" "$out/react.production.min.js"
cp "$work/react-dom/package/umd/react-dom.production.min.js" "$out/react-dom.production.min.js"
{
    echo "GraphiQL 3.8.3 (MIT), React 18.3.1 and ReactDOM 18.3.1 (MIT), from the npm registry"
    echo "by scripts/vendor-graphiql.sh. Their licences follow."
    for name in graphiql react react-dom; do
        echo
        echo "== $name =="
        cat "$work/$name/package/LICENSE"
    done
} > "$out/LICENSES.txt"
echo "wrote $out"
