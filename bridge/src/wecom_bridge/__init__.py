"""WeCom (企业微信) self-built app <-> Dify bridge."""

__version__ = "0.1.0"
