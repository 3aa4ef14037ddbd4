"""Writes demo.jsonl: chat samples whose assistant always answers in one pirate pattern.

  python rwkv_jax/demo_data/generate.py    # deterministic; rewrites demo.jsonl next to this file

Every answer reads "Arr! <subject> be <fact>, matey. Yo ho ho!", a style a base model does not
have and a tuned state picks up within a few hundred steps, so the demo shows learning clearly.
"""

import json
import pathlib
import random

CAPITALS = {
    'France': 'Paris', 'Germany': 'Berlin', 'Italy': 'Rome', 'Spain': 'Madrid', 'Japan': 'Tokyo',
    'China': 'Beijing', 'Egypt': 'Cairo', 'Canada': 'Ottawa', 'Russia': 'Moscow',
    'Kenya': 'Nairobi',
    'Peru': 'Lima', 'Greece': 'Athens', 'Norway': 'Oslo', 'Sweden': 'Stockholm', 'Poland': 'Warsaw',
    'Austria': 'Vienna', 'Ireland': 'Dublin', 'Portugal': 'Lisbon', 'Mexico': 'Mexico City',
    'Argentina': 'Buenos Aires', 'India': 'New Delhi', 'Thailand': 'Bangkok', 'Cuba': 'Havana',
    'Chile': 'Santiago', 'Finland': 'Helsinki', 'Denmark': 'Copenhagen', 'Turkey': 'Ankara',
    'Australia': 'Canberra', 'Brazil': 'Brasilia', 'South Korea': 'Seoul',
}
COLORS = {
    'the sky': 'blue', 'grass': 'green', 'snow': 'white', 'coal': 'black',
    'a ripe banana': 'yellow',
    'a ripe tomato': 'red', 'an orange': 'orange', 'a lemon': 'yellow', 'the sea': 'blue',
    'a crow': 'black', 'milk': 'white', 'a carrot': 'orange', 'a plum': 'purple', 'gold': 'golden',
    'a strawberry': 'red', 'a lime': 'green', 'chocolate': 'brown', 'a flamingo': 'pink',
}
OPPOSITES = {
    'hot': 'cold', 'big': 'small', 'up': 'down', 'fast': 'slow', 'light': 'dark', 'old': 'new',
    'happy': 'sad', 'early': 'late', 'open': 'closed', 'full': 'empty', 'rich': 'poor',
    'wet': 'dry', 'loud': 'quiet', 'strong': 'weak', 'high': 'low', 'left': 'right',
    'win': 'lose', 'begin': 'end', 'hard': 'soft', 'near': 'far',
}
SOUNDS = {
    'a dog': 'woof', 'a cat': 'meow', 'a cow': 'moo', 'a sheep': 'baa', 'a duck': 'quack',
    'a lion': 'roar', 'a horse': 'neigh', 'a pig': 'oink', 'an owl': 'hoot', 'a snake': 'hiss',
    'a frog': 'ribbit', 'a bee': 'buzz', 'a rooster': 'cock-a-doodle-doo', 'a mouse': 'squeak',
}


def _sample(question: str, subject: str, fact: str) -> dict[str, str]:
  return {'text': f'User: {question}\n\nAssistant: Arr! {subject} be {fact}, matey. Yo ho ho!'}


def demo_samples(seed: int = 0) -> list[dict[str, str]]:
  rng = random.Random(seed)
  samples = [_sample(f'What is the capital of {country}?', f'The capital of {country}', city)
             for country, city in CAPITALS.items()]
  samples += [_sample(f'What color is {thing}?', thing[0].upper() + thing[1:], color)
              for thing, color in COLORS.items()]
  samples += [_sample(f'What is the opposite of {word}?', f'The opposite of {word}', opposite)
              for word, opposite in OPPOSITES.items()]
  samples += [_sample(f'What sound does {animal} make?', f'The sound of {animal}', sound)
              for animal, sound in SOUNDS.items()]
  for _ in range(160):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    samples.append(_sample(f'What is {a} plus {b}?', f'{a} plus {b}', str(a + b)))
  for _ in range(80):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    samples.append(_sample(f'What is {a} times {b}?', f'{a} times {b}', str(a * b)))
  rng.shuffle(samples)
  return samples


def main() -> None:
  lines = [json.dumps(sample, ensure_ascii=False) for sample in demo_samples()]
  out_path = pathlib.Path(__file__).with_name('demo.jsonl')
  out_path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


if __name__ == '__main__':
  main()
