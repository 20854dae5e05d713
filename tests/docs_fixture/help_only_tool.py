"""A command-line tool whose parser no importable function builds: the docs checker reads its
options from ``--help`` (tests/test_docs.py)."""
import argparse

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='fixture')
    parser.add_argument('--alpha', type=int)
    parser.add_argument('--beta-gamma', action='store_true')
    parser.add_argument('--hidden', help=argparse.SUPPRESS)
    parser.parse_args()
