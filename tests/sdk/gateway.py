"""What the SDK scripts share: the gateway's address and keys from the environment, its
metrics, and a check that prints what it verified."""

import os
import urllib.request

URL = os.environ["GATEWAY_URL"]
KEY = os.environ["GATEWAY_KEY"]
SLOW_KEY = os.environ["SLOW_KEY"]
METERED_KEY = os.environ["METERED_KEY"]
SPENT_KEY = os.environ["SPENT_KEY"]
METERED_TOKENS = int(os.environ["METERED_TOKENS"])
BROKEN_MODEL = os.environ["GEMINI_MODEL_WITHOUT_KEY"]


def metric(series):
    """The value of one series in /metrics, 0 if absent."""
    text = urllib.request.urlopen(f"{URL}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def check(condition, what):
    """Fails the script unless `condition`; prints `what` when it holds."""
    if not condition:
        raise AssertionError(what)
    print("ok:", what)
