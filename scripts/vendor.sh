#!/usr/bin/env bash
# Refresh the chat page's vendored browser libraries (cortex/static/vendor/) from the npm registry
# at the pinned versions below, with their licence files, and record every file's SHA-256 in
# cortex/static/vendor/SHA256SUMS (tests/test_markdown.py fails when a file no longer matches).
# To upgrade: change a version here, run this script, run the browser tests, commit the result.
# Needs npm (only `npm pack` is used: nothing is installed, no package script runs).
set -euo pipefail
cd "$(dirname "$0")/.."

MARKDOWN_IT=15.0.3
DOMPURIFY=3.5.0
HIGHLIGHT_JS=11.12.0   # @highlightjs/cdn-assets: the ES-module browser build of highlight.js
KATEX=0.19.1

VENDOR=cortex/static/vendor
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

unpack() {  # unpack <package@version> <dir>
  mkdir -p "$WORK/$2"
  (cd "$WORK" && npm pack --silent --ignore-scripts "$1" >/dev/null)
  tar xzf "$WORK"/$(cd "$WORK" && ls -t ./*.tgz | head -1) -C "$WORK/$2"
  rm -f "$WORK"/*.tgz
}

unpack "markdown-it@$MARKDOWN_IT" markdown-it
unpack "dompurify@$DOMPURIFY" dompurify
unpack "@highlightjs/cdn-assets@$HIGHLIGHT_JS" highlight
unpack "katex@$KATEX" katex

rm -rf "$VENDOR"
mkdir -p "$VENDOR"/markdown-it "$VENDOR"/dompurify "$VENDOR"/highlight.js "$VENDOR"/katex
cp "$WORK"/markdown-it/package/dist/browser/markdown-it.esm.min.mjs "$VENDOR"/markdown-it/markdown-it.mjs
cp "$WORK"/markdown-it/package/LICENSE "$VENDOR"/markdown-it/LICENSE
cp "$WORK"/dompurify/package/dist/purify.es.mjs "$VENDOR"/dompurify/purify.mjs
cp "$WORK"/dompurify/package/LICENSE "$VENDOR"/dompurify/LICENSE
cp "$WORK"/dompurify/package/LICENSE-MPL "$VENDOR"/dompurify/LICENSE-MPL
cp "$WORK"/highlight/package/es/highlight.min.js "$VENDOR"/highlight.js/highlight.mjs
cp "$WORK"/highlight/package/LICENSE "$VENDOR"/highlight.js/LICENSE
cp "$WORK"/katex/package/dist/katex.mjs "$VENDOR"/katex/katex.mjs
cp "$WORK"/katex/package/LICENSE "$VENDOR"/katex/LICENSE

cat > "$VENDOR"/VERSIONS <<VERSIONS
markdown-it $MARKDOWN_IT (MIT) dist/browser/markdown-it.esm.min.mjs
dompurify $DOMPURIFY (MPL-2.0 OR Apache-2.0) dist/purify.es.mjs
@highlightjs/cdn-assets $HIGHLIGHT_JS (BSD-3-Clause) es/highlight.min.js (common languages)
katex $KATEX (MIT) dist/katex.mjs (MathML output only: no CSS or fonts needed)
VERSIONS

(cd "$VENDOR" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | sed 's|^\./||' \
  | xargs sha256sum > SHA256SUMS)
echo "vendored into $VENDOR:"
cat "$VENDOR"/VERSIONS
