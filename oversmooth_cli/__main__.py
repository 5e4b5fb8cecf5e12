"""``python -m oversmooth_cli`` works like the ``oversmooth`` command."""

from .cli import main

if __name__ == "__main__":
    main()
