# A made-up value in the shape of an Anthropic API key, for the detectors to find. Built at run time so the
# repository holds no key-shaped literal (secret scanners, and a reader, would take it for a leaked key).
FAKE_API_KEY = "-".join(["sk", "ant", "api03", "abcdefghijklmnop"])
