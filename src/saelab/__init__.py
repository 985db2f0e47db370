"""saelab: JumpReLU sparse autoencoders on Llama-3.2-1B's layer-8 MLP output."""
__version__ = "0.1.0"
