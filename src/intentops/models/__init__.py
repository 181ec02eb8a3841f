"""Model architectures (plain `nn.Module`s and feature builders), one module per conf/model/*.yaml."""
