#!/bin/sh
# Regenerates the screen pictures in this directory with `device-agent render`.
#
#   sh docs/screens/make.sh
#   DEVICE_AGENT="python -m agent.display.render" sh docs/screens/make.sh   # without the CLI
set -eu
cd "$(dirname "$0")"
agent=${DEVICE_AGENT:-device-agent}

for screen in code starting no_network code_expired needs_button throttled denied signed_in \
              refresh_failing config_error stopping; do
    for panel in ssd1306 ssd1306-32 ssd1322 ssd1327; do
        $agent render --panel "$panel" --screen "$screen" --scale 3 \
            --out "$screen-$panel.png" >/dev/null
    done
done
# The colour panels, for the wiring table.
for panel in ssd1351 ssd1331; do
    $agent render --panel "$panel" --screen code --scale 3 --out "code-$panel.png" >/dev/null
done
# A rotated SSD1306 (rotate: 1), and a longer verification URI on the 128x64 panel.
$agent render --panel ssd1306 --rotate 1 --screen code --scale 3 \
    --out code-ssd1306-rotate1.png >/dev/null
# A URL that does not fit beside the QR code: the code screen's two pages.
for page in 1 2; do
    $agent render --panel ssd1306 --screen code --scale 3 --page "$page" \
        --uri "https://sso.identity.kitchen-displays.example-company.co.uk/device?code=004815162" \
        --out "code-ssd1306-long-url-$page.png" >/dev/null
done
ls *.png | wc -l | xargs printf '%s pictures written to docs/screens\n'
