//! The protobuf codec of keybroker's own services: prost's, except that a
//! request body that is not a valid message is the caller's mistake
//! (INVALID_ARGUMENT), not a server failure (tonic's default is INTERNAL,
//! whose message the README promises to keep generic).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The encode and decode buffers of one call start small, not at tonic's
/// 8 KiB (and grow for a large batch): the process allocator zeroes every
/// block it frees (`secret::ZeroOnFree`), so what a call reserves and does
/// not use is still wiped. An UnwrapKey request is a few hundred bytes and
/// its answer about a hundred (a GenerateDataKey answer, with its wrapped
/// key, grows the buffer once); both buffers are freed with the call. At
/// 1 KiB each they were a quarter of all the bytes a cache hit freed.
const DECODE_BUFFER: usize = 512;
const ENCODE_BUFFER: usize = 256;
/// tonic's default: how much a streaming call encodes before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings(size: usize) -> BufferSettings {
    BufferSettings::new(size, YIELD_THRESHOLD)
}

/// `tonic_prost::ProstCodec` with strict decode errors (set in `build.rs`).
#[derive(Debug, Clone)]
pub(crate) struct StrictProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings(ENCODE_BUFFER))
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstDecoder::new(buffer_settings(DECODE_BUFFER)))
    }
}

/// Decodes like prost, refusing invalid input with INVALID_ARGUMENT.
#[derive(Debug)]
pub(crate) struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's error names the field path and the kind of damage; it
        // quotes no bytes of the input.
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "the message is not a valid protobuf encoding of the request type ({e})"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
