"""Medical knowledge: the chest-radiograph knowledge base (kb.py), UMLS import (umls.py)."""
