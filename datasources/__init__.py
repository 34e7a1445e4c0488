"""Where training images come from: the ImageFolder scan, the Fashion-MNIST reader, the built-in
datasets' cache and the .beton converter. Loaders (pipelines/) read what these produce."""
