"""Field numbers of the caffe.proto messages the ``.caffemodel`` reader needs.

Checked against BVLC Caffe's ``src/caffe/proto/caffe.proto`` (github.com/BVLC/caffe, commit
9b891540183ddc834a02b2bd81b31afae71b2153).
"""

# message NetParameter
NET_NAME = 1  # optional string
NET_LAYERS_V1 = 2  # repeated V1LayerParameter (deprecated "layers")
NET_INPUT = 3  # repeated string
NET_INPUT_DIM = 4  # repeated int32
NET_INPUT_SHAPE = 8  # repeated BlobShape
NET_LAYER = 100  # repeated LayerParameter

# message LayerParameter
LAYER_NAME = 1  # optional string
LAYER_TYPE = 2  # optional string
LAYER_BOTTOM = 3  # repeated string
LAYER_TOP = 4  # repeated string
LAYER_PARAM = 6  # repeated ParamSpec
LAYER_BLOBS = 7  # repeated BlobProto
LAYER_INCLUDE = 8  # repeated NetStateRule
LAYER_EXCLUDE = 9  # repeated NetStateRule
LAYER_PHASE = 10  # optional Phase

# message V1LayerParameter
V1_BOTTOM = 2  # repeated string
V1_TOP = 3  # repeated string
V1_NAME = 4  # optional string
V1_TYPE = 5  # optional LayerType (enum)
V1_BLOBS = 6  # repeated BlobProto

# message BlobProto
BLOB_NUM = 1  # optional int32 (legacy 4-D shape)
BLOB_CHANNELS = 2
BLOB_HEIGHT = 3
BLOB_WIDTH = 4
BLOB_DATA = 5  # repeated float [packed = true]
BLOB_DIFF = 6  # repeated float [packed = true]
BLOB_SHAPE = 7  # optional BlobShape
BLOB_DOUBLE_DATA = 8  # repeated double [packed = true]

# message BlobShape
SHAPE_DIM = 1  # repeated int64 [packed = true]

# wire types (protobuf encoding spec)
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# message V1LayerParameter, enum LayerType: number -> (enum name, the current type string that
# upgrade_proto.cpp's UpgradeV1LayerType gives it). Generated from caffe.proto and
# src/caffe/util/upgrade_proto.cpp at the commit above.
V1_LAYER_TYPES = {
    0: ("NONE", ""),
    1: ("ACCURACY", "Accuracy"),
    2: ("BNLL", "BNLL"),
    3: ("CONCAT", "Concat"),
    4: ("CONVOLUTION", "Convolution"),
    5: ("DATA", "Data"),
    6: ("DROPOUT", "Dropout"),
    7: ("EUCLIDEAN_LOSS", "EuclideanLoss"),
    8: ("FLATTEN", "Flatten"),
    9: ("HDF5_DATA", "HDF5Data"),
    10: ("HDF5_OUTPUT", "HDF5Output"),
    11: ("IM2COL", "Im2col"),
    12: ("IMAGE_DATA", "ImageData"),
    13: ("INFOGAIN_LOSS", "InfogainLoss"),
    14: ("INNER_PRODUCT", "InnerProduct"),
    15: ("LRN", "LRN"),
    16: ("MULTINOMIAL_LOGISTIC_LOSS", "MultinomialLogisticLoss"),
    17: ("POOLING", "Pooling"),
    18: ("RELU", "ReLU"),
    19: ("SIGMOID", "Sigmoid"),
    20: ("SOFTMAX", "Softmax"),
    21: ("SOFTMAX_LOSS", "SoftmaxWithLoss"),
    22: ("SPLIT", "Split"),
    23: ("TANH", "TanH"),
    24: ("WINDOW_DATA", "WindowData"),
    25: ("ELTWISE", "Eltwise"),
    26: ("POWER", "Power"),
    27: ("SIGMOID_CROSS_ENTROPY_LOSS", "SigmoidCrossEntropyLoss"),
    28: ("HINGE_LOSS", "HingeLoss"),
    29: ("MEMORY_DATA", "MemoryData"),
    30: ("ARGMAX", "ArgMax"),
    31: ("THRESHOLD", "Threshold"),
    32: ("DUMMY_DATA", "DummyData"),
    33: ("SLICE", "Slice"),
    34: ("MVN", "MVN"),
    35: ("ABSVAL", "AbsVal"),
    36: ("SILENCE", "Silence"),
    37: ("CONTRASTIVE_LOSS", "ContrastiveLoss"),
    38: ("EXP", "Exp"),
    39: ("DECONVOLUTION", "Deconvolution"),
}  # fmt: skip

# the per-type parameter messages UpgradeV1LayerParameter copies unchanged (its order)
V1_PARAM_MESSAGES = (
    "accuracy_param",
    "argmax_param",
    "concat_param",
    "contrastive_loss_param",
    "convolution_param",
    "data_param",
    "dropout_param",
    "dummy_data_param",
    "eltwise_param",
    "exp_param",
    "hdf5_data_param",
    "hdf5_output_param",
    "hinge_loss_param",
    "image_data_param",
    "infogain_loss_param",
    "inner_product_param",
    "lrn_param",
    "memory_data_param",
    "mvn_param",
    "pooling_param",
    "power_param",
    "relu_param",
    "sigmoid_param",
    "softmax_param",
    "slice_param",
    "tanh_param",
    "threshold_param",
    "window_data_param",
    "transform_param",
    "loss_param",
)
