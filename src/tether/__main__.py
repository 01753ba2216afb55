"""``python -m tether`` is the ``tether`` command."""

from .cli import main

if __name__ == "__main__":
    main()
