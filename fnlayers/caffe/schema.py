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
