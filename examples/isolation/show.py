"""Print where each function of the isolation example runs, and why.

Run from the repository root: ``python -m examples.isolation.show``. It resolves isolation
exactly as ``tether worker`` does at start-up (``auto`` probes each module in a throw-away
child process) and connects to nothing. ``tether worker MODULE... --check`` shows the same
with every option's source.
"""

from __future__ import annotations

from tether.runner.worker import Runner

MODULES = ["examples.isolation.tasks", "examples.isolation.numeric"]


def main() -> None:
    resolved = Runner(MODULES).load()
    width = max(map(len, resolved))
    print(f"{'function':<{width}}  {'configured':<14}  {'runs in':<14}  why")
    for name, fn in sorted(resolved.items()):
        print(f"{name:<{width}}  {fn.configured:<14}  {fn.spec.isolation:<14}  {fn.reason}")


if __name__ == "__main__":
    main()
