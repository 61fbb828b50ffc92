import sys
from pathlib import Path

# tests/ modules (factories, support) import each other by plain name.
sys.path.insert(0, str(Path(__file__).parent))
