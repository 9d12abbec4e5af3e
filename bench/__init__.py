"""burrow's benchmark harness: burrow against direct, ``ssh -R`` and HAProxy, side by side.

Run ``python -m bench.run`` (or ``make bench``); see bench/README.md.
"""
