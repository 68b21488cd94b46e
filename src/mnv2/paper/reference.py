"""Numbers published by the paper and by the reference implementations (source: PAPER.md). Every value here is
someone else's; anything printed from this module must be labelled as the paper's (or the reference's)."""

# Paper Figure 5 via the TF-Slim model zoo: (width, resolution) -> (ImageNet top-1 %, millions of multiply-adds).
FIGURE5 = {
    (1.4, 224): (75.0, 582), (1.3, 224): (74.4, 509),
    (1.0, 224): (71.8, 300), (1.0, 192): (70.7, 221), (1.0, 160): (68.8, 154), (1.0, 128): (65.3, 99),
    (1.0, 96): (60.3, 56),
    (0.75, 224): (69.8, 209), (0.75, 192): (68.7, 153), (0.75, 160): (66.4, 107), (0.75, 128): (63.2, 69),
    (0.75, 96): (58.8, 39),
    (0.5, 224): (65.4, 97), (0.5, 192): (63.9, 71), (0.5, 160): (61.0, 50), (0.5, 128): (57.7, 32),
    (0.5, 96): (51.2, 18),
    (0.35, 224): (60.3, 59), (0.35, 192): (58.2, 43), (0.35, 160): (55.7, 30), (0.35, 128): (50.8, 20),
    (0.35, 96): (45.5, 11),
}
# TF-Slim model zoo parameter counts (1001 classes), in millions.
FIGURE5_PARAMS_M = {1.4: 6.06, 1.3: 5.34, 1.0: 3.47, 0.75: 2.61, 0.5: 1.95, 0.35: 1.66}

# The Figure 5 grid as `mnv2 profile --grid` walks it.
GRID_WIDTHS = (1.0, 0.75, 0.5, 0.35)
GRID_RESOLUTIONS = (224, 192, 160, 128, 96)
GRID_EXTRA = ((1.4, 224), (1.3, 224))

# Paper Table 3 (section 5.1): "max number of channels / memory (in Kb) that needs to be materialized at each spatial
# resolution", 16-bit activations, input 224. Per model: resolution -> (channels, kB); kB None is the paper's "O(1)".
# The paper's kB are 1000 bytes (e.g. 128 x 56 x 56 x 2 bytes = 802,816 -> "800").
TABLE3 = {
    "mobilenet_v1": {112: (1, None), 56: (128, 800), 28: (256, 400), 14: (512, 200), 7: (1024, 199), 1: (1024, 2)},
    "mobilenet_v2": {112: (1, None), 56: (32, 200), 28: (64, 100), 14: (160, 62), 7: (320, 32), 1: (1280, 2)},
    "shufflenet_v1": {112: (1, None), 56: (48, 300), 28: (400, 600), 14: (800, 310), 7: (1600, 156), 1: (1600, 3)},
}
TABLE3_MAX_KB = {"mobilenet_v1": 800, "mobilenet_v2": 200, "shufflenet_v1": 600}

# Paper Table 4 (ImageNet): network -> (top-1 %, params in millions, MAdds in millions, Pixel 1 CPU ms or None).
TABLE4 = {
    "MobileNetV1": (70.6, 4.2, 575, 113),
    "ShuffleNet (1.5)": (71.5, 3.4, 292, None),
    "ShuffleNet (x2)": (73.7, 5.4, 524, None),
    "NasNet-A": (74.0, 5.3, 564, 183),
    "MobileNetV2": (72.0, 3.4, 300, 75),
    "MobileNetV2 (1.4)": (74.7, 6.9, 585, 143),
}
# The configuration each Table 3 column describes (the paper's ShuffleNet column is "ShuffleNet (2x, g=3)").
TABLE3_CONFIG = {"mobilenet_v1": {"width_mult": 1.0}, "mobilenet_v2": {"width_mult": 1.0},
                 "shufflenet_v1": {"width_mult": 2.0, "groups": 3}}
# What to know when reading a Table 3 column beside ours (docs/memory.md explains every cell).
TABLE3_NOTES = {
    "shufflenet_v1": "the paper's ShuffleNet column is headed (2x, g=3), but its cells from 28x28 down (400 / 800 / "
                     "1600 channels) are the g=2 2x widths; ours are the g=3 2x model's (480 / 960 / 1920, 1.2x), "
                     "the model of the paper's Table 4.",
}

# Paper Table 5 (section 6.2): the prediction layers of SSD and SSDLite on MobileNetV2, 80 classes:
# heads -> (params in millions, multiply-adds in billions). The paper states neither the input size nor whether the
# extra feature layers are included; docs/detection.md compares the variants.
TABLE5 = {"ssd": (14.8, 1.25), "ssdlite": (2.1, 0.35)}
# Paper Table 6 (COCO test-dev): network -> (mAP, params in millions, MAdds in billions, Pixel 1 CPU ms or None).
TABLE6 = {
    "SSD300": (23.2, 36.1, 35.2, None),
    "SSD512": (26.8, 36.1, 99.5, None),
    "YOLOv2": (21.6, 50.7, 17.5, None),
    "MNet V1 + SSDLite": (22.2, 5.1, 1.3, 270),
    "MNet V2 + SSDLite": (22.1, 4.3, 0.8, 200),
}

# Paper Table 7 (section 6.3, PASCAL VOC 2012 val): (network, output stride, ASPP, MF) -> (mIoU %, params in millions,
# multiply-adds in billions). MF = multi-scale inputs + left-right flips; "MNet V2*" = the heads on the 320-channel
# output of the last bottleneck. The paper's inputs are 512 x 512 (TF DeepLab evaluates 513 x 513 crops).
TABLE7 = {
    ("MNet V1", 16, True, False): (75.29, 11.15, 14.25),
    ("MNet V1", 8, True, True): (78.56, 11.15, 941.9),
    ("MNet V2*", 16, True, False): (75.70, 4.52, 5.8),
    ("MNet V2*", 8, True, True): (78.42, 4.52, 387),
    ("MNet V2*", 16, False, False): (75.32, 2.11, 2.75),
    ("MNet V2*", 8, False, True): (77.33, 2.11, 152.6),
    ("ResNet-101", 16, True, False): (80.49, 58.16, 81.0),
    ("ResNet-101", 8, True, True): (82.70, 58.16, 4870.6),
}
# The MF input scales (each also flipped left-right) and the model each Table 7 network is here (ResNet-101: none).
TABLE7_MF_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
TABLE7_MODELS = {"MNet V1": "deeplabv3_mobilenet_v1", "MNet V2*": "deeplabv3_mobilenet_v2"}

# Paper Table 1 (the bottleneck block), symbolically: (input, operator, output) with h, w, k, t, s, k'.
TABLE1 = (
    ("h x w x k", "1x1 conv2d, ReLU6", "h x w x tk"),
    ("h x w x tk", "3x3 dwise s=s, ReLU6", "h/s x w/s x tk"),
    ("h/s x w/s x tk", "linear 1x1 conv2d", "h/s x w/s x k'"),
)
# Paper Table 2 (the network at 224): (input, operator, t, c, n, s); None where the paper prints "-".
TABLE2 = (
    ("224x224x3", "conv2d", None, 32, 1, 2),
    ("112x112x32", "bottleneck", 1, 16, 1, 1),
    ("112x112x16", "bottleneck", 6, 24, 2, 2),
    ("56x56x24", "bottleneck", 6, 32, 3, 2),
    ("28x28x32", "bottleneck", 6, 64, 4, 2),
    ("14x14x64", "bottleneck", 6, 96, 3, 1),
    ("14x14x96", "bottleneck", 6, 160, 3, 2),
    ("7x7x160", "bottleneck", 6, 320, 1, 1),
    ("7x7x320", "conv2d 1x1", None, 1280, 1, 1),
    ("7x7x1280", "avgpool 7x7", None, None, 1, None),
    ("1x1x1280", "conv2d 1x1", None, "k", None, None),
)
