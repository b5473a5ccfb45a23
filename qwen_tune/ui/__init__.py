"""`qwen-tune ui`: a local web page over the same commands (data view, launch, watch, talk); server.py starts it."""
