"""Host adapters: other libraries' networks seen through the engine's Denoiser interface D(x, sigma, cond).

Each host lives in its own module and is imported on demand (``from diffinstruct.hosts import diffusers``),
so importing the package never pulls in a host library.
"""
