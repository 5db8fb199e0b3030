"""The Mask-free OVIS generator: ITM activation map, proposals, eq. 6 pseudo box, eq. 7 WSS mask."""
