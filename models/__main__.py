"""`python -m models`: list the registered architectures with parameters and MACs per input shape."""
import os
import sys

from . import create_model, list_models, summarize

SHAPES = {"1x28x28": (1, 28), "3x32x32": (3, 32)}


def main() -> None:
    width = max(len("model"), *map(len, list_models())) + 2
    print(f"{'model':<{width}}" + "".join(f"{'params ' + k:>20}{'MACs ' + k:>18}" for k in SHAPES))
    for name in list_models():
        row = f"{name:<{width}}"
        for channels, size in SHAPES.values():
            s = summarize(create_model(name, channels, 10, size), (channels, size, size))
            row += f"{s['num_params']:>20,}{s['macs']:>18,}"
        print(row)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `python -m models | head`: the reader has left (models imports no pipeline: stage.run does this for imgcls)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
