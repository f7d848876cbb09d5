"""DVC pipeline stages: download -> train -> evaluate -> export -> promote -> package."""
