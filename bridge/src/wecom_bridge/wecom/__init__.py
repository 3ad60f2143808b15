"""WeCom's protocol and API: callback crypto, message XML, the client, the errcode table."""
