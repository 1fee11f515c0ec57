"""``python -m seg.models``: print the registered backbones with their parameters and GMACs (the README table)."""

from .complexity import backbone_table

if __name__ == "__main__":
    print(backbone_table())
