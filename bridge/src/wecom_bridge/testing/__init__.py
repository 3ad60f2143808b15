"""Test doubles of WeCom (callbacks it sends, the API it serves) and of Dify's Service API.

One implementation serves the unit tests, molecule, the demo and the simulator: the doubles run as
real HTTP servers (`ServerThread` in-process, `serve_forever` behind the CLI subcommands).
"""
