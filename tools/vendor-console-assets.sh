#!/bin/sh
# Re-make the browser console's vendored files in web/static from the npm registry
# (not run by setup or CI: the files are committed). Needs node and npm.
#   xterm.js, xterm.css   @xterm/xterm's built files (source map comment removed)
#   novnc.js              @novnc/novnc's core/rfb.js bundled by esbuild as one ES module
#                         that sets window.RFB (noVNC has a top-level await: not an IIFE)
set -eu
cd "$(dirname "$0")/.."
XTERM=6.0.0
NOVNC=1.7.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm install --no-audit --no-fund --silent "@xterm/xterm@$XTERM" "@novnc/novnc@$NOVNC" esbuild)
sed '/^\/\/# sourceMappingURL=/d' "$work/node_modules/@xterm/xterm/lib/xterm.js" > web/static/xterm.js
cp "$work/node_modules/@xterm/xterm/css/xterm.css" web/static/xterm.css
cp "$work/node_modules/@xterm/xterm/LICENSE" web/static/xterm.LICENSE.txt
echo "import RFB from './node_modules/@novnc/novnc/core/rfb.js'; window.RFB = RFB;" > "$work/entry.js"
(cd "$work" && ./node_modules/.bin/esbuild entry.js --bundle --format=esm --minify --outfile=novnc.js)
cp "$work/novnc.js" web/static/novnc.js
cp "$work/node_modules/@novnc/novnc/LICENSE.txt" web/static/novnc.LICENSE.txt
echo "vendored @xterm/xterm $XTERM and @novnc/novnc $NOVNC into web/static"
