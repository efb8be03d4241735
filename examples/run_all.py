"""Run every example script offline, as the test command does; fail on the first that fails."""

import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # offline, whatever the shell has
for script in sorted(here.glob("*.py")):
    if script.name == Path(__file__).name:
        continue
    print(f"examples: {script.name}", flush=True)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"examples/{script.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
print("examples: all ran")
